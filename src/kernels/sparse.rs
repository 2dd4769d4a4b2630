//! The sparse delta of sparse fine-tuning: a `[N, K]` weight W plus `scatter(δ)`, the values
//! δ at sorted flat indices `e = n·K + k` (zero elsewhere). With x `[M, K]` and dy `[M, N]`:
//!
//! - forward `y += x·scatter(δ)ᵀ`: `y[m, n_e] += x[m, k_e]·δ_e` (SpMM);
//! - backward `dx += dy·scatter(δ)`: `dx[m, k_e] += dy[m, n_e]·δ_e` (SpMM, transposed), and
//!   `dδ_e = Σ_m dy[m, n_e]·x[m, k_e]` (SDDMM).
//!
//! Each costs M·nnz multiply-adds, so with 1% density the delta adds about 1% to the dense
//! layer; the dense part (`x·Wᵀ`, `dy·W`) runs on the GEMM as for a frozen weight.

use crate::kernels::check_len;
use crate::{Error, Result};

/// Sizes: x `[m, k]`, dy and y `[m, n]`, W `[n, k]`.
#[derive(Clone, Copy, Debug)]
pub struct SparseParams {
    pub m: usize,
    pub n: usize,
    pub k: usize,
}

/// Checks that `indices` increase strictly and fall inside the `[n, k]` matrix.
pub fn check_indices(op: &'static str, indices: &[u32], n: usize, k: usize) -> Result<()> {
    if let Some(p) = indices.windows(2).position(|w| w[0] >= w[1]) {
        return Err(Error::InvalidArgument(format!("{op}: sparse indices must increase strictly (position {})", p + 1)));
    }
    if let Some(&last) = indices.last() {
        if last as usize >= n * k {
            return Err(Error::InvalidArgument(format!("{op}: sparse index {last} outside the [{n}, {k}] matrix")));
        }
    }
    Ok(())
}

#[allow(clippy::needless_range_loop)]
pub mod reference {
    use super::SparseParams;

    /// The dense `[n, k]` matrix `scatter(δ)`.
    pub fn scatter(indices: &[u32], delta: &[f64], p: SparseParams) -> Vec<f64> {
        let mut w = vec![0.0; p.n * p.k];
        for (&e, &d) in indices.iter().zip(delta) {
            w[e as usize] += d;
        }
        w
    }

    /// `dδ_e = Σ_m dy[m, n_e]·x[m, k_e]`.
    pub fn sddmm(dy: &[f64], x: &[f64], indices: &[u32], p: SparseParams) -> Vec<f64> {
        indices
            .iter()
            .map(|&e| {
                let (n, k) = (e as usize / p.k, e as usize % p.k);
                (0..p.m).map(|m| dy[m * p.n + n] * x[m * p.k + k]).sum()
            })
            .collect()
    }
}

pub mod cpu {
    use rayon::prelude::*;

    use super::SparseParams;
    use crate::device::cpu::rows_per_task;

    /// (row, column) of each flat index, split once per call so the loops over tokens do no
    /// integer division.
    fn coords(indices: &[u32], k: usize) -> Vec<(u32, u32)> {
        indices.iter().map(|&e| (e / k as u32, e % k as u32)).collect()
    }

    /// Whether to fold δ into a copy of W (one copy of W, then the GEMM alone) rather than run
    /// the scalar SpMM beside the GEMM: the SpMM's M·nnz scattered multiply-adds cost more
    /// than copying the N·K weight once M·nnz passes about a quarter of N·K, which a training
    /// batch always does; decoding a token at a time (M = 1) at low density does not.
    pub fn fold_delta(p: SparseParams, nnz: usize) -> bool {
        4 * p.m * nnz > p.n * p.k
    }

    /// `W + scatter(δ)` as a new matrix.
    pub fn with_delta(w: &[f32], indices: &[u32], delta: &[f32]) -> Vec<f32> {
        let mut out = w.to_vec();
        for (&e, &d) in indices.iter().zip(delta) {
            out[e as usize] += d;
        }
        out
    }

    /// `y[m, n_e] += x[m, k_e]·δ_e`, rows of y in parallel.
    pub fn spmm_add(x: &[f32], indices: &[u32], delta: &[f32], y: &mut [f32], p: SparseParams) {
        let nk = coords(indices, p.k);
        let rows = rows_per_task(p.n.max(indices.len()));
        y.par_chunks_mut(rows * p.n).zip(x.par_chunks(rows * p.k)).for_each(|(yb, xb)| {
            for (yr, xr) in yb.chunks_mut(p.n).zip(xb.chunks(p.k)) {
                for (&(n, k), &d) in nk.iter().zip(delta) {
                    yr[n as usize] += xr[k as usize] * d;
                }
            }
        });
    }

    /// `dx[m, k_e] += dy[m, n_e]·δ_e`, rows of dx in parallel.
    pub fn spmm_t_add(dy: &[f32], indices: &[u32], delta: &[f32], dx: &mut [f32], p: SparseParams) {
        let nk = coords(indices, p.k);
        let rows = rows_per_task(p.k.max(indices.len()));
        dx.par_chunks_mut(rows * p.k).zip(dy.par_chunks(rows * p.n)).for_each(|(xb, yb)| {
            for (xr, yr) in xb.chunks_mut(p.k).zip(yb.chunks(p.n)) {
                for (&(n, k), &d) in nk.iter().zip(delta) {
                    xr[k as usize] += yr[n as usize] * d;
                }
            }
        });
    }

    /// `dδ_e = Σ_m dy[m, n_e]·x[m, k_e]`: dy and x are transposed once, so each entry is a
    /// contiguous dot product over the M tokens.
    pub fn sddmm(dy: &[f32], x: &[f32], indices: &[u32], p: SparseParams) -> Vec<f32> {
        let dyt = transpose(dy, p.m, p.n);
        let xt = transpose(x, p.m, p.k);
        indices
            .par_iter()
            .with_min_len(256)
            .map(|&e| {
                let (n, k) = (e as usize / p.k, e as usize % p.k);
                let (a, b) = (&dyt[n * p.m..(n + 1) * p.m], &xt[k * p.m..(k + 1) * p.m]);
                let mut lanes = [0.0f32; 8];
                let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
                let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
                for (u, v) in ca.zip(cb) {
                    for l in 0..8 {
                        lanes[l] += u[l] * v[l];
                    }
                }
                lanes.iter().sum::<f32>() + tail
            })
            .collect()
    }

    /// `[rows, cols]` → `[cols, rows]`, in cache-sized tiles.
    fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
        const T: usize = 32;
        let mut out = vec![0.0f32; rows * cols];
        out.par_chunks_mut(T * rows).enumerate().for_each(|(cb, ob)| {
            let c0 = cb * T;
            for r0 in (0..rows).step_by(T) {
                for c in c0..(c0 + T).min(cols) {
                    for r in r0..(r0 + T).min(rows) {
                        ob[(c - c0) * rows + r] = a[r * cols + c];
                    }
                }
            }
        });
        out
    }
}

/// Length checks shared by the op.
pub(crate) fn check(op: &'static str, x: usize, indices: &[u32], delta: usize, p: SparseParams) -> Result<()> {
    check_len(op, "x", x, p.m * p.k)?;
    if delta != indices.len() {
        return Err(Error::InvalidArgument(format!("{op}: {} sparse indices but {delta} values", indices.len())));
    }
    check_indices(op, indices, p.n, p.k)
}
