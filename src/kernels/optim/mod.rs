//! Optimizer steps: SM3 (dense and sparse) and AdamW, each one fused pass over the gradient.
//!
//! **SM3** (Anil et al., 2019) on an `[R, C]` matrix keeps row accumulators `r` `[R]` and
//! column accumulators `c` `[C]`. With `g` the gradient times the clipping factor `s`:
//!
//!   v      = min(r_i, c_j) + g²                 (r, c as they were before this step)
//!   u      = g / (sqrt(v) + eps)
//!   u      ← m ← β1·m + (1 - β1)·u              (only with momentum, β1 > 0)
//!   w      ← w·(1 - lr·λ) - lr·u
//!   r_i'   = max_j v,   c_j' = max_i v
//!
//! A vector of length L is the `[L, 1]` case: its single column accumulator is the maximum of
//! all row accumulators, so `min(r_i, c_0) = r_i` and every element keeps its own Adagrad
//! accumulator (L + 1 floats of state).
//!
//! **Sparse SM3** (for SpIEL sparse fine-tuning) updates only the active entries of the
//! matrix, given as sorted flat indices `i·C + j` with their values (the deltas) and
//! gradients. `v`, `u` and the update are as above; a row (column) with at least one active
//! entry gets `r_i' = max v` over its active entries, one without keeps its accumulator.
//! Momentum is per active entry.
//!
//! **AdamW** in torch.optim.AdamW's order (see `crate::optim::AdamW`), with `g = s·grad`:
//!
//!   w ← w·(1 - lr·λ);  m ← m + (1 - β1)·(g - m);  v ← β2·v + (1 - β2)·g²
//!   w ← w - (lr / (1 - β1^t)) · m / (sqrt(v) / sqrt(1 - β2^t) + eps)
//!
//! **Clipping** by the global norm: `s = max_norm / (norm + 1e-6)` when `norm > max_norm > 0`,
//! else 1 (torch's `clip_grad_norm_`); `clip_scale` computes it from the sum of squares, and
//! the steps take `s` so that scaling costs no extra pass. On a GPU the sum of squares stays on
//! the device (`cuda::sum_squares`, `wgsl::sum_squares`) and the steps compute `s` from it
//! in-kernel when given a `DeviceClip`; the effective scale is then `grad_scale · s`.
//!
//! Kernels: `kernels-cuda/optim.cu` (f32 math; parameters f32, or bf16 with an optional f32
//! master copy), `kernels-wgsl/optim_{sm3,sm3_sparse,adamw,sumsq}.wgsl` (f32). The GPU dense
//! SM3 step double-buffers the accumulators: it reads `r_old`, `c_old` and writes the maxima
//! into `r_new`, `c_new` (zeroed by the launcher); the caller swaps them for the next step.

use crate::kernels::check_len;
use crate::{Error, Result};

/// Hyper-parameters of one SM3 step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sm3Params {
    pub lr: f32,
    pub eps: f32,
    /// Momentum coefficient β1; 0 turns momentum off (no momentum buffer needed).
    pub beta1: f32,
    /// Decoupled weight decay λ.
    pub weight_decay: f32,
    /// Gradient scale s (the clipping factor; 1 for none).
    pub grad_scale: f32,
}

/// Hyper-parameters of one AdamW step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWParams {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// Step number t, from 1 (bias correction).
    pub step: u32,
    pub grad_scale: f32,
}

/// The clipping factor for a global gradient norm of `sqrt(sum_sq)`.
pub fn clip_scale(sum_sq: f64, max_norm: f32) -> f32 {
    let norm = sum_sq.sqrt() as f32;
    if max_norm > 0.0 && norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    }
}

/// The host-side factors of an AdamW step, in f32 exactly as `cpu::adamw` computes them:
/// (decay `1 - lr·λ`, step size `lr / (1 - β1^t)`, `sqrt(1 - β2^t)`).
fn adamw_factors(p: &AdamWParams) -> (f32, f32, f32) {
    let t = p.step as i32;
    (1.0 - p.lr * p.weight_decay, p.lr / (1.0 - p.beta1.powi(t)), (1.0 - p.beta2.powi(t)).sqrt())
}

#[allow(clippy::too_many_arguments)]
fn check_dense(op: &'static str, w: usize, g: usize, r: usize, c: usize, mom: Option<usize>, rows: usize, cols: usize) -> Result<()> {
    let n = rows * cols;
    if w != n || g != n {
        return Err(Error::InvalidArgument(format!("{op}: weight has {w} and gradient {g} elements, the [{rows}, {cols}] matrix {n}")));
    }
    check_len(op, "r", r, rows)?;
    check_len(op, "c", c, cols)?;
    if let Some(m) = mom {
        check_len(op, "momentum", m, n)?;
    }
    Ok(())
}

/// Checks sparse SM3's inputs: lengths agree, indices strictly increasing and inside the matrix.
fn check_sparse(indices: &[u32], delta: usize, g: usize, mom: Option<usize>, rows: usize, cols: usize) -> Result<()> {
    const OP: &str = "sm3_sparse";
    let n = indices.len();
    if delta != n || g != n || mom.is_some_and(|m| m != n) {
        return Err(Error::InvalidArgument(format!("{OP}: {n} indices but {delta} values, {g} gradients")));
    }
    crate::kernels::sparse::check_indices(OP, indices, rows, cols)
}

/// Plain loops in f64, the spec the fast paths are tested against.
#[allow(clippy::needless_range_loop, clippy::too_many_arguments)]
pub mod reference {
    use super::{AdamWParams, Sm3Params};

    /// One SM3 element update; returns v.
    fn sm3_element(w: &mut f64, g: f64, acc: f64, mom: Option<&mut f64>, p: &Sm3Params) -> f64 {
        let v = acc + g * g;
        let mut u = g / (v.sqrt() + p.eps as f64);
        if let Some(m) = mom {
            *m = p.beta1 as f64 * *m + (1.0 - p.beta1 as f64) * u;
            u = *m;
        }
        *w = *w * (1.0 - p.lr as f64 * p.weight_decay as f64) - p.lr as f64 * u;
        v
    }

    pub fn sm3(w: &mut [f64], grad: &[f64], r: &mut [f64], c: &mut [f64], mut mom: Option<&mut [f64]>, rows: usize, cols: usize, p: Sm3Params) {
        let (r_old, c_old) = (r.to_vec(), c.to_vec());
        r.iter_mut().for_each(|x| *x = 0.0);
        c.iter_mut().for_each(|x| *x = 0.0);
        for i in 0..rows {
            for j in 0..cols {
                let e = i * cols + j;
                let g = grad[e] * p.grad_scale as f64;
                let v = sm3_element(&mut w[e], g, r_old[i].min(c_old[j]), mom.as_deref_mut().map(|m| &mut m[e]), &p);
                r[i] = r[i].max(v);
                c[j] = c[j].max(v);
            }
        }
    }

    pub fn sm3_sparse(indices: &[u32], delta: &mut [f64], grad: &[f64], r: &mut [f64], c: &mut [f64], mut mom: Option<&mut [f64]>, cols: usize, p: Sm3Params) {
        let (r_old, c_old) = (r.to_vec(), c.to_vec());
        let (mut r_new, mut c_new) = (vec![None::<f64>; r.len()], vec![None::<f64>; c.len()]);
        for (e, &flat) in indices.iter().enumerate() {
            let (i, j) = (flat as usize / cols, flat as usize % cols);
            let g = grad[e] * p.grad_scale as f64;
            let v = sm3_element(&mut delta[e], g, r_old[i].min(c_old[j]), mom.as_deref_mut().map(|m| &mut m[e]), &p);
            r_new[i] = Some(r_new[i].map_or(v, |x: f64| x.max(v)));
            c_new[j] = Some(c_new[j].map_or(v, |x: f64| x.max(v)));
        }
        for (x, n) in r.iter_mut().zip(r_new) {
            *x = n.unwrap_or(*x);
        }
        for (x, n) in c.iter_mut().zip(c_new) {
            *x = n.unwrap_or(*x);
        }
    }

    pub fn adamw(w: &mut [f64], grad: &[f64], m: &mut [f64], v: &mut [f64], p: AdamWParams) {
        let t = p.step as i32;
        let (b1, b2) = (p.beta1 as f64, p.beta2 as f64);
        let step_size = p.lr as f64 / (1.0 - b1.powi(t));
        let bc2_sqrt = (1.0 - b2.powi(t)).sqrt();
        for e in 0..w.len() {
            let g = grad[e] * p.grad_scale as f64;
            w[e] *= 1.0 - p.lr as f64 * p.weight_decay as f64;
            m[e] += (1.0 - b1) * (g - m[e]);
            v[e] = b2 * v[e] + (1.0 - b2) * g * g;
            w[e] -= step_size * m[e] / (v[e].sqrt() / bc2_sqrt + p.eps as f64);
        }
    }
}

/// The fast CPU paths: rayon over rows (SM3) or chunks (AdamW), f32.
#[allow(clippy::too_many_arguments)]
pub mod cpu {
    use rayon::prelude::*;

    use super::{check_dense, check_sparse, AdamWParams, Sm3Params};
    use crate::Result;

    #[inline(always)]
    fn sm3_element(w: &mut f32, g: f32, acc: f32, mom: Option<&mut f32>, p: &Sm3Params, decay: f32) -> f32 {
        let v = acc + g * g;
        let mut u = g / (v.sqrt() + p.eps);
        if let Some(m) = mom {
            *m = p.beta1 * *m + (1.0 - p.beta1) * u;
            u = *m;
        }
        *w = *w * decay - p.lr * u;
        v
    }

    /// Dense SM3 on a row-major `[rows, cols]` matrix. Row blocks run in parallel, each
    /// with its own column maxima, merged at the end (max is exact, so the result does not
    /// depend on the split).
    pub fn sm3(w: &mut [f32], g: &[f32], r: &mut [f32], c: &mut [f32], mom: Option<&mut [f32]>, rows: usize, cols: usize, p: Sm3Params) -> Result<()> {
        check_dense("sm3", w.len(), g.len(), r.len(), c.len(), mom.as_ref().map(|m| m.len()), rows, cols)?;
        if rows * cols == 0 {
            return Ok(());
        }
        let decay = 1.0 - p.lr * p.weight_decay;
        // Row blocks of at least 64K elements, and few enough that merging their column
        // maxima stays cheap.
        let block = ((1 << 16) / cols.max(1) + 1).max(rows.div_ceil(4 * rayon::current_num_threads()));
        let c_old: &[f32] = c;
        let mut mom_blocks: Vec<Option<&mut [f32]>> = match mom {
            Some(m) => m.chunks_mut(block * cols).map(Some).collect(),
            None => (0..rows.div_ceil(block)).map(|_| None).collect(),
        };
        let col_max: Vec<f32> = w
            .par_chunks_mut(block * cols)
            .zip(g.par_chunks(block * cols))
            .zip(r.par_chunks_mut(block))
            .zip(mom_blocks.par_iter_mut())
            .map(|(((wb, gb), rb), mb)| {
                let mut cmax = vec![0.0f32; cols];
                let mut v = vec![0.0f32; cols];
                for (row, ((wr, gr), ri)) in wb.chunks_mut(cols).zip(gb.chunks(cols)).zip(rb.iter_mut()).enumerate() {
                    // Separate passes over the row (v, then the update, then the maxima), each
                    // a straight loop the compiler vectorises.
                    let r_old = *ri;
                    for ((v, &gj), &cj) in v.iter_mut().zip(gr).zip(c_old) {
                        let gs = gj * p.grad_scale;
                        *v = r_old.min(cj) + gs * gs;
                    }
                    match mb.as_deref_mut() {
                        Some(m) => {
                            let mr = &mut m[row * cols..(row + 1) * cols];
                            for (((w, &gj), &vj), m) in wr.iter_mut().zip(gr).zip(&v).zip(mr) {
                                let u = gj * p.grad_scale / (vj.sqrt() + p.eps);
                                *m = p.beta1 * *m + (1.0 - p.beta1) * u;
                                *w = *w * decay - p.lr * *m;
                            }
                        }
                        None => {
                            for ((w, &gj), &vj) in wr.iter_mut().zip(gr).zip(&v) {
                                *w = *w * decay - p.lr * (gj * p.grad_scale / (vj.sqrt() + p.eps));
                            }
                        }
                    }
                    let mut lanes = [0.0f32; 8];
                    for (vc, cc) in v.chunks(8).zip(cmax.chunks_mut(8)) {
                        for ((&vj, cm), l) in vc.iter().zip(cc).zip(lanes.iter_mut()) {
                            *cm = cm.max(vj);
                            *l = l.max(vj);
                        }
                    }
                    *ri = lanes.iter().fold(0.0f32, |a, &b| a.max(b));
                }
                cmax
            })
            .reduce_with(|mut a, b| {
                a.iter_mut().zip(b).for_each(|(x, y)| *x = x.max(y));
                a
            })
            .expect("at least one row block");
        c.copy_from_slice(&col_max);
        Ok(())
    }

    /// Sparse SM3 over the active entries (sorted flat indices into a `[rows, cols]` matrix).
    pub fn sm3_sparse(indices: &[u32], delta: &mut [f32], g: &[f32], r: &mut [f32], c: &mut [f32], mut mom: Option<&mut [f32]>, rows: usize, cols: usize, p: Sm3Params) -> Result<()> {
        check_sparse(indices, delta.len(), g.len(), mom.as_ref().map(|m| m.len()), rows, cols)?;
        crate::kernels::check_len("sm3_sparse", "r", r.len(), rows)?;
        crate::kernels::check_len("sm3_sparse", "c", c.len(), cols)?;
        let decay = 1.0 - p.lr * p.weight_decay;
        // Rows are contiguous runs of the sorted indices; a column's new value needs the old
        // values of every row first, so the new column maxima go to a side buffer.
        let mut c_new: Vec<Option<f32>> = vec![None; cols];
        let mut e = 0;
        while e < indices.len() {
            let i = indices[e] as usize / cols;
            let (r_old, mut rmax) = (r[i], 0.0f32);
            while e < indices.len() && indices[e] as usize / cols == i {
                let j = indices[e] as usize % cols;
                let v = sm3_element(&mut delta[e], g[e] * p.grad_scale, r_old.min(c[j]), mom.as_deref_mut().map(|m| &mut m[e]), &p, decay);
                rmax = rmax.max(v);
                c_new[j] = Some(c_new[j].map_or(v, |x| x.max(v)));
                e += 1;
            }
            r[i] = rmax;
        }
        for (cj, n) in c.iter_mut().zip(c_new) {
            if let Some(n) = n {
                *cj = n;
            }
        }
        Ok(())
    }

    pub fn adamw(w: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], p: AdamWParams) -> Result<()> {
        let n = w.len();
        if g.len() != n || m.len() != n || v.len() != n {
            return Err(crate::Error::InvalidArgument(format!(
                "adamw: weight {n}, gradient {}, moments {} and {} elements differ",
                g.len(),
                m.len(),
                v.len()
            )));
        }
        let (decay, step_size, bc2_sqrt) = super::adamw_factors(&p);
        const CHUNK: usize = 1 << 14;
        w.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK)).zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK))).for_each(|((w, g), (m, v))| {
            for e in 0..w.len() {
                let g = g[e] * p.grad_scale;
                w[e] *= decay;
                m[e] += (1.0 - p.beta1) * (g - m[e]);
                v[e] = p.beta2 * v[e] + (1.0 - p.beta2) * g * g;
                w[e] -= step_size * m[e] / (v[e].sqrt() / bc2_sqrt + p.eps);
            }
        });
        Ok(())
    }

    /// Sum of squares of every gradient, in f64 partials (for `clip_scale`).
    pub fn sum_squares(grads: &[&[f32]]) -> f64 {
        grads.iter().map(|g| g.par_chunks(1 << 14).map(|c| c.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>()).sum::<f64>()).sum()
    }
}

pub mod cuda;
pub mod wgsl;
