//! One row times a matrix (M = 1: decoding one token), on the CPU. The product is one pass over
//! B's bytes, so it is split over rayon's threads by columns of c. The `gemm` crate runs this
//! shape on one thread: 21-25 GiB/s at K 4096 on the 2-core AVX-512 machine, where this runs
//! at 41-50 GiB/s (`benches/kernels.rs`, gemv/cpu). A weight as stored, `[N, K]` (the model's
//! layout when decoding), goes four rows a pass: 56-62 GiB/s there, against 40-48 a row at a
//! time.
//!
//! Each output is summed in a fixed order whatever the split (over k in order in the `[K, N]`
//! layout, in `math::dot`'s lanes in the `[N, K]` one), so the bits do not depend on the number
//! of threads; they differ from the `gemm` crate's in rounding.

use rayon::prelude::*;

use super::MatmulParams;
use crate::kernels::math::{dot, wide};

/// Below this many bytes of B one thread does the product: a rayon dispatch costs a few µs,
/// about what streaming 256 KiB takes.
const PARALLEL_BYTES: usize = 256 << 10;

/// Columns of c per task in the `[K, N]` layout: the partial sums stay in L1 while B's rows
/// stream past.
const MAX_TILE: usize = 1024;

/// `c = a·op(b)`, or `c += beta·a·op(b)` with `acc`, for a single row a of K elements (`p.m`
/// is 1; `trans_a` changes nothing for one row). `threads` as `GEMM_THREADS`: 0, a few tasks
/// per rayon thread; 1, this thread only; more, at most that many tasks (so at most that many
/// threads). The caller checked the lengths and that N, K > 0.
pub(super) fn gemv(a: &[f32], b: &[f32], c: &mut [f32], p: MatmulParams, acc: Option<f32>, threads: usize) {
    debug_assert!(p.m == 1 && a.len() >= p.k && b.len() >= p.k * p.n && c.len() >= p.n && p.n > 0 && p.k > 0);
    let (n, k) = (p.n, p.k);
    let (a, c) = (&a[..k], &mut c[..n]);
    let parallel = threads != 1 && k * n * 4 >= PARALLEL_BYTES;
    let pool = rayon::current_num_threads().max(1);
    // Columns of c per task: a few tasks per pool thread for balance, or one per allowed thread.
    let per_task = |balanced: usize| if threads > 1 { n.div_ceil(threads) } else { balanced };
    let land = |ci: &mut f32, v: f32| *ci = match acc {
        Some(beta) => *ci + beta * v,
        None => v,
    };
    if p.trans_b {
        // B is W [N, K]: output j is the dot product of a with W's row j, four rows a pass.
        let rows = |(j0, cs): (usize, &mut [f32])| {
            let row = |j: usize| &b[j * k..][..k];
            let mut quads = cs.chunks_exact_mut(4);
            let mut j = j0;
            for q in &mut quads {
                for (ci, v) in q.iter_mut().zip(dot4(a, [row(j), row(j + 1), row(j + 2), row(j + 3)])) {
                    land(ci, v);
                }
                j += 4;
            }
            for ci in quads.into_remainder() {
                land(ci, dot(a, row(j)));
                j += 1;
            }
        };
        let chunk = per_task(n.div_ceil(4 * pool)).max(16);
        if parallel {
            c.par_chunks_mut(chunk).enumerate().for_each(|(i, cs)| rows((i * chunk, cs)));
        } else {
            rows((0, c));
        }
    } else {
        // B is [K, N]: a tile of columns sums a[k]·B[k, tile] over the rows in order; a task
        // takes one tile, or under a thread limit a span of whole tiles.
        let tile = n.div_ceil(2 * pool).next_multiple_of(16).clamp(64, MAX_TILE);
        let span = per_task(tile).next_multiple_of(tile);
        let cols = |(i, cs): (usize, &mut [f32])| {
            for (t, ct) in cs.chunks_mut(tile).enumerate() {
                let mut sum = [0.0f32; MAX_TILE];
                let sum = &mut sum[..ct.len()];
                rows_times_tile(sum, a, &b[i * span + t * tile..], n);
                for (ci, &v) in ct.iter_mut().zip(sum.iter()) {
                    land(ci, v);
                }
            }
        };
        if parallel {
            c.par_chunks_mut(span).enumerate().for_each(cols);
        } else {
            cols((0, c));
        }
    }
}

wide! {
    /// The dot products of `a` with four rows, each summed as `math::dot` sums one (sixteen
    /// lanes, then in order), so with its bits: the four sums share a's loads, and their four
    /// chains of adds overlap where one row's would wait on each add (at K 576 that wait was as
    /// long as the row's loads).
    fn dot4(a: &[f32], rows: [&[f32]; 4]) -> [f32; 4] = dot4_lanes
}

#[inline(always)]
fn dot4_lanes(a: &[f32], rows: [&[f32]; 4]) -> [f32; 4] {
    let k = a.len();
    let [r0, r1, r2, r3] = rows.map(|r| &r[..k]);
    let (mut l0, mut l1, mut l2, mut l3) = ([0.0f32; 16], [0.0f32; 16], [0.0f32; 16], [0.0f32; 16]);
    // Zipped chunks, one accumulator per row: written with an array of rows indexed in the loop,
    // LLVM did not vectorise it (17 GiB/s against 57 at K 4096).
    let chunks = a.chunks_exact(16).zip(r0.chunks_exact(16)).zip(r1.chunks_exact(16)).zip(r2.chunks_exact(16)).zip(r3.chunks_exact(16));
    for ((((x, y0), y1), y2), y3) in chunks {
        for i in 0..16 {
            l0[i] += x[i] * y0[i];
            l1[i] += x[i] * y1[i];
            l2[i] += x[i] * y2[i];
            l3[i] += x[i] * y3[i];
        }
    }
    let full = k - k % 16;
    let sum = |l: &[f32; 16], r: &[f32]| l.iter().sum::<f32>() + a[full..].iter().zip(&r[full..]).map(|(x, y)| x * y).sum::<f32>();
    [sum(&l0, r0), sum(&l1, r1), sum(&l2, r2), sum(&l3, r3)]
}

wide! {
    /// `y[i] += Σ_k a[k]·b[k·ldb + i]` for `i < y.len()`, k in order, four rows of b a pass
    /// (y is read and written once per four rows), in the CPU's widest vectors.
    fn rows_times_tile(y: &mut [f32], a: &[f32], b: &[f32], ldb: usize) = rows_times_tile_lanes
}

#[inline(always)]
fn rows_times_tile_lanes(y: &mut [f32], a: &[f32], b: &[f32], ldb: usize) {
    let w = y.len();
    let row = |k: usize| &b[k * ldb..][..w];
    let mut quads = a.chunks_exact(4);
    let mut k = 0;
    for q in &mut quads {
        let (r0, r1, r2, r3) = (row(k), row(k + 1), row(k + 2), row(k + 3));
        for i in 0..w {
            // Left to right: the same order as one row at a time.
            y[i] = y[i] + q[0] * r0[i] + q[1] * r1[i] + q[2] * r2[i] + q[3] * r3[i];
        }
        k += 4;
    }
    for &ak in quads.remainder() {
        for (yi, &bi) in y.iter_mut().zip(row(k)) {
            *yi += ak * bi;
        }
        k += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::matmul::reference;
    use crate::rng::Rng;
    use crate::testing::{compare, Tolerance};

    #[test]
    fn four_rows_at_once_sum_as_one_row_does() {
        for k in [1, 5, 16, 17, 203, 576] {
            let mut rng = Rng::new(k as u64);
            let a = rng.vec(k, -1.0, 1.0);
            let w = rng.vec(4 * k, -1.0, 1.0);
            let rows = [0, 1, 2, 3].map(|i| &w[i * k..][..k]);
            let four = dot4(&a, rows);
            for (i, r) in rows.iter().enumerate() {
                assert_eq!(four[i].to_bits(), dot(&a, r).to_bits(), "k={k} row {i}");
            }
        }
    }

    #[test]
    fn one_row_matches_the_f64_product_in_both_layouts_and_any_thread_count() {
        // N past one tile and not a multiple of 16; K not a multiple of 4; B past the
        // parallel threshold, and a small one below it.
        for (n, k) in [(1500, 203), (7, 5), (64, 1)] {
            let mut rng = Rng::new(n as u64);
            let a = rng.vec(k, -1.0, 1.0);
            let b = rng.vec(k * n, -1.0, 1.0);
            let c0 = rng.vec(n, -1.0, 1.0);
            for trans_b in [false, true] {
                let p = MatmulParams { m: 1, n, k, trans_a: false, trans_b };
                let f64v = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
                let ab = reference::matmul(&f64v(&a), &f64v(&b), p);
                let mut first: Option<Vec<f32>> = None;
                // 2 and 3: under a limit, tasks of whole tiles (spans of one or more).
                for threads in [0, 1, 2, 3] {
                    let mut c = vec![f32::NAN; n];
                    gemv(&a, &b, &mut c, p, None, threads);
                    compare(&format!("gemv n={n} k={k} trans_b={trans_b} threads={threads}"), &c, &ab, Tolerance::F32).unwrap();
                    // The same bits on one thread, on all of them and under a limit.
                    match &first {
                        None => first = Some(c),
                        Some(f) => assert!(f.iter().zip(&c).all(|(x, y)| x.to_bits() == y.to_bits()), "gemv n={n} k={k}: threads change the bits"),
                    }
                    let mut c = c0.clone();
                    gemv(&a, &b, &mut c, p, Some(0.5), threads);
                    let want: Vec<f64> = c0.iter().zip(&ab).map(|(&c, &v)| c as f64 + 0.5 * v).collect();
                    compare(&format!("gemv acc n={n} k={k} trans_b={trans_b}"), &c, &want, Tolerance::F32).unwrap();
                }
            }
        }
    }
}
