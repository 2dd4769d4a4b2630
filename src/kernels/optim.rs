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

/// CUDA launchers over cudarc's types. Parameters `T = f32` (kernel suffix `f32`) or bf16 bits
/// (`T = u16`, suffix `bf16`, with an optional f32 master copy); gradients have the parameters'
/// type; moments, momenta and accumulators are f32.
#[allow(clippy::too_many_arguments)]
pub mod cuda {
    use std::sync::Arc;

    use cudarc::driver::{CudaStream, CudaView, CudaViewMut, DeviceRepr, LaunchArgs, LaunchConfig, PushKernelArg};

    use super::{adamw_factors, check_dense, AdamWParams, Sm3Params};
    use crate::device::cuda::ModuleCache;
    use crate::kernels::check_len;
    use crate::{Error, Result};

    /// Rows and columns of a dense SM3 tile (one block of 32×8 threads); see optim.cu.
    const SM3_TILE: (usize, usize) = (64, 128);
    const BLOCK: u32 = 256;
    /// At most this many f64 partials per gradient buffer in `sum_squares`.
    const SUMSQ_MAX_BLOCKS: usize = 1024;

    /// The clip factor computed in-kernel from a device sum of squares (as `sum_squares`
    /// writes it): `max_norm / (norm + 1e-6)` when `norm > max_norm > 0`, else 1.
    pub struct DeviceClip<'a> {
        /// One f64: the sum of squares of every gradient.
        pub sum_sq: CudaView<'a, f64>,
        pub max_norm: f32,
    }

    fn suffix<T>(op: &str) -> Result<&'static str> {
        match std::mem::size_of::<T>() {
            4 => Ok("f32"),
            2 => Ok("bf16"),
            s => Err(Error::InvalidArgument(format!("{op}: no CUDA kernel for {s}-byte parameters"))),
        }
    }

    fn to_i32(op: &str, what: &str, v: usize) -> Result<i32> {
        i32::try_from(v).map_err(|_| Error::InvalidArgument(format!("{op}: {what} = {v} exceeds i32")))
    }

    fn launch_err(op: &'static str) -> impl Fn(cudarc::driver::DriverError) -> Error {
        move |e| Error::cuda(format!("launching {op}"), e)
    }

    /// Checks the master copy: only with bf16 parameters, and as long as them.
    fn check_master<T>(op: &'static str, master: Option<usize>, n: usize) -> Result<()> {
        match master {
            Some(_) if std::mem::size_of::<T>() == 4 => {
                Err(Error::InvalidArgument(format!("{op}: a master copy goes with bf16 parameters, these are f32")))
            }
            Some(m) => check_len(op, "master", m, n),
            None => Ok(()),
        }
    }

    /// Pushes an optional buffer, or a null pointer.
    fn push_opt<'a, T>(b: &mut LaunchArgs<'a>, v: Option<&'a mut CudaViewMut<'_, T>>, null: &'a u64) {
        match v {
            Some(v) => b.arg(v),
            None => b.arg(null),
        };
    }

    /// Dense SM3 step on a row-major `[rows, cols]` matrix (a vector is `[L, 1]`). Reads `r_old`,
    /// `c_old`; zeroes `r_new`, `c_new` and writes the new accumulators there (swap them for
    /// the next step). With `master` (bf16 only) the f32 master is updated and `w` gets its
    /// rounded value.
    pub fn sm3<T: DeviceRepr>(
        stream: &Arc<CudaStream>,
        modules: &ModuleCache,
        w: &mut CudaViewMut<'_, T>,
        g: &CudaView<'_, T>,
        master: Option<&mut CudaViewMut<'_, f32>>,
        r_old: &CudaView<'_, f32>,
        c_old: &CudaView<'_, f32>,
        r_new: &mut CudaViewMut<'_, f32>,
        c_new: &mut CudaViewMut<'_, f32>,
        mom: Option<&mut CudaViewMut<'_, f32>>,
        rows: usize,
        cols: usize,
        p: Sm3Params,
        clip: Option<&DeviceClip<'_>>,
    ) -> Result<()> {
        const OP: &str = "sm3";
        check_dense(OP, w.len(), g.len(), r_old.len(), c_old.len(), mom.as_ref().map(|m| m.len()), rows, cols)?;
        check_len(OP, "r_new", r_new.len(), rows)?;
        check_len(OP, "c_new", c_new.len(), cols)?;
        check_master::<T>(OP, master.as_ref().map(|m| m.len()), rows * cols)?;
        let (r, c) = (to_i32(OP, "rows", rows)?, to_i32(OP, "cols", cols)?);
        stream.memset_zeros(r_new).map_err(launch_err(OP))?;
        stream.memset_zeros(c_new).map_err(launch_err(OP))?;
        if rows * cols == 0 {
            return Ok(());
        }
        let s = suffix::<T>(OP)?;
        let f = modules.function("optim", &format!("sm3_dense_{s}"))?;
        let cfg = LaunchConfig {
            grid_dim: (cols.div_ceil(SM3_TILE.1) as u32, rows.div_ceil(SM3_TILE.0).min(65535) as u32, 1),
            block_dim: (32, 8, 1),
            shared_mem_bytes: 0,
        };
        let decay = 1.0 - p.lr * p.weight_decay;
        let max_norm = clip.map_or(0.0, |c| c.max_norm);
        let null = 0u64;
        let mut b = stream.launch_builder(&f);
        b.arg(w).arg(g);
        if s == "bf16" {
            push_opt(&mut b, master, &null);
        }
        b.arg(r_old).arg(c_old).arg(r_new).arg(c_new);
        push_opt(&mut b, mom, &null);
        match clip {
            Some(c) => b.arg(&c.sum_sq),
            None => b.arg(&null),
        };
        b.arg(&r).arg(&c).arg(&p.lr).arg(&p.eps).arg(&p.beta1).arg(&decay).arg(&p.grad_scale).arg(&max_norm);
        // SAFETY: argument types and order match the kernel; lengths checked above.
        unsafe { b.launch(cfg) }.map_err(launch_err(OP))?;
        Ok(())
    }

    /// Sparse SM3 step (f32) over the active entries `indices` (flat `i·cols + j`, each at most
    /// once) of a `[rows, cols]` matrix; `r` and `c` are updated in place (rows and columns
    /// with no active entry keep theirs). Indices outside the matrix are skipped by the kernel;
    /// unlike `cpu::sm3_sparse` the order of the indices does not matter here.
    pub fn sm3_sparse(
        stream: &Arc<CudaStream>,
        modules: &ModuleCache,
        indices: &CudaView<'_, u32>,
        delta: &mut CudaViewMut<'_, f32>,
        g: &CudaView<'_, f32>,
        r: &mut CudaViewMut<'_, f32>,
        c: &mut CudaViewMut<'_, f32>,
        mom: Option<&mut CudaViewMut<'_, f32>>,
        rows: usize,
        cols: usize,
        p: Sm3Params,
        clip: Option<&DeviceClip<'_>>,
    ) -> Result<()> {
        const OP: &str = "sm3_sparse";
        let n = indices.len();
        check_len(OP, "delta", delta.len(), n)?;
        check_len(OP, "gradient", g.len(), n)?;
        if let Some(m) = &mom {
            check_len(OP, "momentum", m.len(), n)?;
        }
        check_len(OP, "r", r.len(), rows)?;
        check_len(OP, "c", c.len(), cols)?;
        let (n_i, r_i, c_i) = (to_i32(OP, "active entries", n)?, to_i32(OP, "rows", rows)?, to_i32(OP, "cols", cols)?);
        if n == 0 || rows * cols == 0 {
            return Ok(());
        }
        let mut tmp = stream.alloc_zeros::<u32>(rows + cols).map_err(|e| Error::cuda(format!("{OP}: scratch of {} u32", rows + cols), e))?;
        let (mut r_tmp, mut c_tmp) = tmp.split_at_mut(rows);
        let decay = 1.0 - p.lr * p.weight_decay;
        let max_norm = clip.map_or(0.0, |c| c.max_norm);
        let null = 0u64;
        let f = modules.function("optim", "sm3_sparse_f32")?;
        let cfg = LaunchConfig { grid_dim: ((n as u32).div_ceil(BLOCK), 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
        {
            let (r_old, c_old) = (r.as_view(), c.as_view());
            let mut b = stream.launch_builder(&f);
            b.arg(indices).arg(delta).arg(g).arg(&r_old).arg(&c_old).arg(&mut r_tmp).arg(&mut c_tmp);
            push_opt(&mut b, mom, &null);
            match clip {
                Some(c) => b.arg(&c.sum_sq),
                None => b.arg(&null),
            };
            b.arg(&n_i).arg(&r_i).arg(&c_i).arg(&p.lr).arg(&p.eps).arg(&p.beta1).arg(&decay).arg(&p.grad_scale).arg(&max_norm);
            // SAFETY: argument types and order match the kernel; lengths checked above.
            unsafe { b.launch(cfg) }.map_err(launch_err(OP))?;
        }
        let f = modules.function("optim", "sm3_sparse_finish")?;
        let cfg = LaunchConfig {
            grid_dim: ((rows.max(cols) as u32).div_ceil(BLOCK), 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: as above.
        unsafe { stream.launch_builder(&f).arg(r).arg(c).arg(&mut r_tmp).arg(&mut c_tmp).arg(&r_i).arg(&c_i).launch(cfg) }
            .map_err(launch_err(OP))?;
        Ok(())
    }

    /// Fused AdamW step over `n` parameters (the length of `w`).
    pub fn adamw<T: DeviceRepr>(
        stream: &Arc<CudaStream>,
        modules: &ModuleCache,
        w: &mut CudaViewMut<'_, T>,
        g: &CudaView<'_, T>,
        master: Option<&mut CudaViewMut<'_, f32>>,
        m: &mut CudaViewMut<'_, f32>,
        v: &mut CudaViewMut<'_, f32>,
        p: AdamWParams,
        clip: Option<&DeviceClip<'_>>,
    ) -> Result<()> {
        const OP: &str = "adamw";
        let n = w.len();
        check_len(OP, "gradient", g.len(), n)?;
        check_len(OP, "m", m.len(), n)?;
        check_len(OP, "v", v.len(), n)?;
        check_master::<T>(OP, master.as_ref().map(|m| m.len()), n)?;
        if p.step == 0 {
            return Err(Error::InvalidArgument(format!("{OP}: step counts from 1")));
        }
        if n == 0 {
            return Ok(());
        }
        let s = suffix::<T>(OP)?;
        let f = modules.function("optim", &format!("adamw_{s}"))?;
        let blocks = u32::try_from(n.div_ceil(BLOCK as usize))
            .map_err(|_| Error::InvalidArgument(format!("{OP}: {n} parameters is too many for one launch")))?;
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
        let (decay, step_size, bc2_sqrt) = adamw_factors(&p);
        let max_norm = clip.map_or(0.0, |c| c.max_norm);
        let (null, n_i) = (0u64, n as i64);
        let mut b = stream.launch_builder(&f);
        b.arg(w).arg(g);
        if s == "bf16" {
            push_opt(&mut b, master, &null);
        }
        b.arg(m).arg(v);
        match clip {
            Some(c) => b.arg(&c.sum_sq),
            None => b.arg(&null),
        };
        b.arg(&n_i).arg(&p.beta1).arg(&p.beta2).arg(&p.eps).arg(&decay).arg(&step_size).arg(&bc2_sqrt).arg(&p.grad_scale).arg(&max_norm);
        // SAFETY: argument types and order match the kernel; lengths checked above.
        unsafe { b.launch(cfg) }.map_err(launch_err(OP))?;
        Ok(())
    }

    /// Blocks of 256 threads for a gradient of `n` elements: a function of `n` only, so the
    /// summation order (and the result) is the same run to run.
    fn sumsq_blocks(n: usize) -> usize {
        n.div_ceil(4 * BLOCK as usize).min(SUMSQ_MAX_BLOCKS)
    }

    /// Writes the sum of squares of every element of every buffer in `grads` to `sum_sq[0]`
    /// (f64), deterministically: f64 partials per block, then one block sums them in order.
    pub fn sum_squares<T: DeviceRepr>(
        stream: &Arc<CudaStream>,
        modules: &ModuleCache,
        grads: &[CudaView<'_, T>],
        sum_sq: &mut CudaViewMut<'_, f64>,
    ) -> Result<()> {
        const OP: &str = "sum_squares";
        check_len(OP, "sum_sq", sum_sq.len(), 1)?;
        let s = suffix::<T>(OP)?;
        let total: usize = grads.iter().map(|g| sumsq_blocks(g.len())).sum();
        let mut partials = stream.alloc_zeros::<f64>(total.max(1)).map_err(|e| Error::cuda(format!("{OP}: {total} partials"), e))?;
        let f = modules.function("optim", &format!("sumsq_partial_{s}"))?;
        let mut offset = 0;
        for g in grads {
            let blocks = sumsq_blocks(g.len());
            if blocks == 0 {
                continue;
            }
            let mut part = partials.slice_mut(offset..offset + blocks);
            let n = g.len() as i64;
            let cfg = LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
            // SAFETY: argument types match the kernel; the partials slice holds `blocks` values.
            unsafe { stream.launch_builder(&f).arg(g).arg(&n).arg(&mut part).launch(cfg) }.map_err(launch_err(OP))?;
            offset += blocks;
        }
        let f = modules.function("optim", "sumsq_finish")?;
        let count = to_i32(OP, "partials", total)?;
        let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: as above; `sum_sq` holds at least one f64.
        unsafe { stream.launch_builder(&f).arg(&partials).arg(&count).arg(sum_sq).launch(cfg) }.map_err(launch_err(OP))?;
        Ok(())
    }
}

/// WGSL launchers over wgpu's types, f32. Buffers need STORAGE usage (and COPY_DST for the
/// ones the launchers zero: `r_new`, `c_new`); a buffer may be longer than its data.
#[allow(clippy::too_many_arguments)]
pub mod wgsl {
    use super::{adamw_factors, check_dense, AdamWParams, Sm3Params};
    use crate::device::wgpu::{grid, uniform, KernelCache};
    use crate::kernels::check_len;
    use crate::{Error, Result};

    pub const SM3_SOURCE: &str = include_str!("../../kernels-wgsl/optim_sm3.wgsl");
    pub const SM3_SPARSE_SOURCE: &str = include_str!("../../kernels-wgsl/optim_sm3_sparse.wgsl");
    pub const ADAMW_SOURCE: &str = include_str!("../../kernels-wgsl/optim_adamw.wgsl");
    pub const SUMSQ_SOURCE: &str = include_str!("../../kernels-wgsl/optim_sumsq.wgsl");
    const WG: u32 = 256;
    const SM3_TILE: usize = 16;
    const SUMSQ_MAX_GROUPS: usize = 256;
    const FLAG_MOMENTUM: u32 = 1;
    const FLAG_CLIP: u32 = 2;

    /// The clip factor computed in-kernel from a device sum of squares (one f32, as
    /// `sum_squares` writes it): `max_norm / (norm + 1e-6)` when `norm > max_norm > 0`, else 1.
    pub struct DeviceClip<'a> {
        pub sum_sq: &'a wgpu::Buffer,
        pub max_norm: f32,
    }

    #[repr(C)]
    #[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
    struct Sm3Uniform {
        /// Dense: rows, cols, tile columns; sparse: active entries, rows, cols.
        dims: [u32; 3],
        flags: u32,
        lr: f32,
        eps: f32,
        beta1: f32,
        decay: f32,
        scale: f32,
        max_norm: f32,
        _pad: [u32; 2],
    }

    impl Sm3Uniform {
        fn new(dims: [u32; 3], flags: u32, p: &Sm3Params, max_norm: f32) -> Self {
            Sm3Uniform { dims, flags, lr: p.lr, eps: p.eps, beta1: p.beta1, decay: 1.0 - p.lr * p.weight_decay, scale: p.grad_scale, max_norm, _pad: [0; 2] }
        }
    }

    #[repr(C)]
    #[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
    struct AdamWUniform {
        n: u32,
        flags: u32,
        beta1: f32,
        beta2: f32,
        eps: f32,
        decay: f32,
        step_size: f32,
        bc2_sqrt: f32,
        scale: f32,
        max_norm: f32,
        _pad: [u32; 2],
    }

    #[repr(C)]
    #[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
    struct SumSqUniform {
        n: u32,
        offset: u32,
        count: u32,
        _pad: u32,
    }

    fn to_u32(op: &str, what: &str, v: usize) -> Result<u32> {
        u32::try_from(v).map_err(|_| Error::InvalidArgument(format!("{op}: {what} = {v} exceeds u32")))
    }

    fn check_buf(op: &'static str, what: &str, b: &wgpu::Buffer, elems: usize) -> Result<()> {
        check_len(op, what, b.size() as usize / 4, elems)
    }

    /// A bound-but-unused stand-in for an absent optional buffer (momentum, sum of squares).
    fn placeholder(device: &wgpu::Device) -> wgpu::Buffer {
        device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("tuna unused binding"),
            size: 16,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        })
    }

    /// One compute pass: `pipeline` with `(binding, buffer)` pairs of group 0 (an entry point
    /// binds only what it uses, so bindings need not be contiguous).
    fn encode(
        device: &wgpu::Device,
        enc: &mut wgpu::CommandEncoder,
        pipeline: &wgpu::ComputePipeline,
        buffers: &[(u32, &wgpu::Buffer)],
        workgroups: (u32, u32),
    ) {
        let layout = pipeline.get_bind_group_layout(0);
        let entries: Vec<wgpu::BindGroupEntry> =
            buffers.iter().map(|(i, b)| wgpu::BindGroupEntry { binding: *i, resource: b.as_entire_binding() }).collect();
        let bind = device.create_bind_group(&wgpu::BindGroupDescriptor { label: None, layout: &layout, entries: &entries });
        let mut pass = enc.begin_compute_pass(&Default::default());
        pass.set_pipeline(pipeline);
        pass.set_bind_group(0, &bind, &[]);
        pass.dispatch_workgroups(workgroups.0, workgroups.1, 1);
    }

    fn clip_parts<'a>(clip: Option<&DeviceClip<'a>>, none: &'a wgpu::Buffer) -> (u32, f32, &'a wgpu::Buffer) {
        match clip {
            Some(c) => (FLAG_CLIP, c.max_norm, c.sum_sq),
            None => (0, 0.0, none),
        }
    }

    /// Dense SM3 step on a row-major `[rows, cols]` matrix (a vector is `[L, 1]`). Reads
    /// `r_old`, `c_old`; zeroes `r_new`, `c_new` (COPY_DST) and writes the new accumulators
    /// there, as f32 bit patterns (swap them for the next step).
    pub fn sm3(
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        kernels: &KernelCache,
        w: &wgpu::Buffer,
        g: &wgpu::Buffer,
        r_old: &wgpu::Buffer,
        c_old: &wgpu::Buffer,
        r_new: &wgpu::Buffer,
        c_new: &wgpu::Buffer,
        mom: Option<&wgpu::Buffer>,
        rows: usize,
        cols: usize,
        p: Sm3Params,
        clip: Option<&DeviceClip<'_>>,
    ) -> Result<()> {
        const OP: &str = "sm3";
        let len = |b: &wgpu::Buffer| b.size() as usize / 4;
        check_dense(OP, rows * cols, rows * cols, len(r_old), len(c_old), mom.map(len), rows, cols)?;
        check_buf(OP, "w", w, rows * cols)?;
        check_buf(OP, "gradient", g, rows * cols)?;
        check_buf(OP, "r_new", r_new, rows)?;
        check_buf(OP, "c_new", c_new, cols)?;
        let tiles_c = cols.div_ceil(SM3_TILE);
        let tiles = to_u32(OP, "tiles", rows.div_ceil(SM3_TILE) * tiles_c)?;
        let (rows_u, cols_u) = (to_u32(OP, "rows", rows)?, to_u32(OP, "cols", cols)?);
        let mut enc = device.create_command_encoder(&Default::default());
        enc.clear_buffer(r_new, 0, None);
        enc.clear_buffer(c_new, 0, None);
        if tiles > 0 {
            // Two stand-ins: one buffer bound both read-write and read-only is a usage conflict.
            let (none, none_rw) = (placeholder(device), placeholder(device));
            let (clip_flag, max_norm, sum_sq) = clip_parts(clip, &none);
            let u = uniform(
                device,
                &Sm3Uniform::new([rows_u, cols_u, tiles_c as u32], clip_flag | if mom.is_some() { FLAG_MOMENTUM } else { 0 }, &p, max_norm),
            );
            let pipe = kernels.pipeline(device, "optim_sm3_dense", SM3_SOURCE, "sm3_dense")?;
            let m = mom.unwrap_or(&none_rw);
            let binds = [(0, &u), (1, w), (2, g), (3, r_old), (4, c_old), (5, r_new), (6, c_new), (7, m), (8, sum_sq)];
            encode(device, &mut enc, &pipe, &binds, grid(tiles));
        }
        queue.submit([enc.finish()]);
        Ok(())
    }

    /// Sparse SM3 step over the active entries `indices` (u32 flat `i·cols + j`, each at most
    /// once; the order does not matter here) of a `[rows, cols]` matrix; `r` and `c` are
    /// updated in place, rows and columns with no active entry keep theirs. `n` is the number
    /// of active entries (the buffers may be longer). Indices past the matrix are skipped.
    pub fn sm3_sparse(
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        kernels: &KernelCache,
        indices: &wgpu::Buffer,
        n: usize,
        delta: &wgpu::Buffer,
        g: &wgpu::Buffer,
        r: &wgpu::Buffer,
        c: &wgpu::Buffer,
        mom: Option<&wgpu::Buffer>,
        rows: usize,
        cols: usize,
        p: Sm3Params,
        clip: Option<&DeviceClip<'_>>,
    ) -> Result<()> {
        const OP: &str = "sm3_sparse";
        check_buf(OP, "indices", indices, n)?;
        check_buf(OP, "delta", delta, n)?;
        check_buf(OP, "gradient", g, n)?;
        if let Some(m) = mom {
            check_buf(OP, "momentum", m, n)?;
        }
        check_buf(OP, "r", r, rows)?;
        check_buf(OP, "c", c, cols)?;
        if n == 0 || rows * cols == 0 {
            return Ok(());
        }
        // Fresh wgpu buffers are zero-filled: 0 is "untouched" in the kernel's encoding.
        let tmp = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("tuna sm3_sparse maxima"),
            size: ((rows + cols) * 4) as u64,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        let (none, none_rw) = (placeholder(device), placeholder(device));
        let (clip_flag, max_norm, sum_sq) = clip_parts(clip, &none);
        let u = uniform(
            device,
            &Sm3Uniform::new([to_u32(OP, "active entries", n)?, to_u32(OP, "rows", rows)?, to_u32(OP, "cols", cols)?], clip_flag | if mom.is_some() { FLAG_MOMENTUM } else { 0 }, &p, max_norm),
        );
        let step = kernels.pipeline(device, "optim_sm3_sparse", SM3_SPARSE_SOURCE, "sm3_sparse")?;
        let finish = kernels.pipeline(device, "optim_sm3_sparse_finish", SM3_SPARSE_SOURCE, "sm3_sparse_finish")?;
        let m = mom.unwrap_or(&none_rw);
        let mut enc = device.create_command_encoder(&Default::default());
        let binds = [(0, &u), (1, indices), (2, delta), (3, g), (4, r), (5, c), (6, m), (7, sum_sq), (8, &tmp)];
        encode(device, &mut enc, &step, &binds, grid((n as u32).div_ceil(WG)));
        let groups = to_u32(OP, "rows", rows.max(cols))?.div_ceil(WG);
        encode(device, &mut enc, &finish, &[(0, &u), (4, r), (5, c), (8, &tmp)], grid(groups));
        queue.submit([enc.finish()]);
        Ok(())
    }

    /// Fused AdamW step over the first `n` elements of the buffers.
    pub fn adamw(
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        kernels: &KernelCache,
        w: &wgpu::Buffer,
        g: &wgpu::Buffer,
        m: &wgpu::Buffer,
        v: &wgpu::Buffer,
        n: usize,
        p: AdamWParams,
        clip: Option<&DeviceClip<'_>>,
    ) -> Result<()> {
        const OP: &str = "adamw";
        for (what, b) in [("w", w), ("gradient", g), ("m", m), ("v", v)] {
            check_buf(OP, what, b, n)?;
        }
        if p.step == 0 {
            return Err(Error::InvalidArgument(format!("{OP}: step counts from 1")));
        }
        if n == 0 {
            return Ok(());
        }
        let none = placeholder(device);
        let (clip_flag, max_norm, sum_sq) = clip_parts(clip, &none);
        let (decay, step_size, bc2_sqrt) = adamw_factors(&p);
        let u = uniform(
            device,
            &AdamWUniform {
                n: to_u32(OP, "n", n)?,
                flags: clip_flag,
                beta1: p.beta1,
                beta2: p.beta2,
                eps: p.eps,
                decay,
                step_size,
                bc2_sqrt,
                scale: p.grad_scale,
                max_norm,
                _pad: [0; 2],
            },
        );
        let pipe = kernels.pipeline(device, "optim_adamw", ADAMW_SOURCE, "adamw")?;
        let mut enc = device.create_command_encoder(&Default::default());
        encode(device, &mut enc, &pipe, &[(0, &u), (1, w), (2, g), (3, m), (4, v), (5, sum_sq)], grid((n as u32).div_ceil(WG)));
        queue.submit([enc.finish()]);
        Ok(())
    }

    /// Writes the sum of squares of the first `n` elements of every `(buffer, n)` in `grads`
    /// to `sum_sq[0]` (f32): per-workgroup partials, then one workgroup sums them in order.
    pub fn sum_squares(
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        kernels: &KernelCache,
        grads: &[(&wgpu::Buffer, usize)],
        sum_sq: &wgpu::Buffer,
    ) -> Result<()> {
        const OP: &str = "sum_squares";
        check_buf(OP, "sum_sq", sum_sq, 1)?;
        let groups = |n: usize| n.div_ceil(4 * WG as usize).min(SUMSQ_MAX_GROUPS);
        for (k, (b, n)) in grads.iter().enumerate() {
            check_buf(OP, &format!("gradient {k}"), b, *n)?;
            to_u32(OP, "n", *n)?;
        }
        let total: usize = grads.iter().map(|(_, n)| groups(*n)).sum();
        let partials = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("tuna sum_squares partials"),
            size: (total.max(1) * 4) as u64,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        let part = kernels.pipeline(device, "optim_sumsq_partial", SUMSQ_SOURCE, "sumsq_partial")?;
        let finish = kernels.pipeline(device, "optim_sumsq_finish", SUMSQ_SOURCE, "sumsq_finish")?;
        let mut enc = device.create_command_encoder(&Default::default());
        let mut offset = 0;
        for (b, n) in grads {
            let gr = groups(*n);
            if gr == 0 {
                continue;
            }
            let u = uniform(device, &SumSqUniform { n: *n as u32, offset: offset as u32, count: 0, _pad: 0 });
            encode(device, &mut enc, &part, &[(0, &u), (1, &partials), (2, b)], (gr as u32, 1));
            offset += gr;
        }
        let u = uniform(device, &SumSqUniform { n: 0, offset: 0, count: to_u32(OP, "partials", total)?, _pad: 0 });
        encode(device, &mut enc, &finish, &[(0, &u), (1, &partials), (3, sum_sq)], (1, 1));
        queue.submit([enc.finish()]);
        Ok(())
    }
}
