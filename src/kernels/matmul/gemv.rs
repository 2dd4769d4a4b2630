//! One row times a matrix (M = 1: decoding one token), on the CPU. The product is one pass over
//! B's bytes, so it is split over rayon's threads by columns of c. The `gemm` crate runs this
//! shape on one thread: 21-25 GiB/s at K 4096 on the 2-core AVX-512 machine, where this runs
//! at 41-50 GiB/s (`benches/kernels.rs`, gemv/cpu). A weight as stored, `[N, K]` (the model's
//! layout when decoding), goes four rows a pass: 56-62 GiB/s there, against 40-48 a row at a
//! time.
//!
//! A weight kept in bf16 (`gemv_bf16`) is read the same way, each element widened to f32 in
//! registers, so half the bytes give the f32 result; each pass also prefetches the next four
//! rows' lines. On SmolLM-135M's decoding (K 576, rows of 1,152 bytes) the prefetch took the
//! bf16 model from 86 to 130 tokens/s; on the f32 path the bench's rows did not gain from it
//! (K 4096: a few percent slower), so that path does not prefetch.
//!
//! Each output is summed in a fixed order whatever the split (over k in order in the `[K, N]`
//! layout, in `math::dot`'s lanes in the `[N, K]` one), so the bits do not depend on the number
//! of threads; they differ from the `gemm` crate's in rounding.

use half::bf16;
use rayon::prelude::*;

use super::MatmulParams;
use crate::kernels::math::{dot, wide};

/// An element of a weight read as f32: an f32, or a bf16, whose bits are the upper half of
/// an f32's (so the widening is exact, and a bf16 weight multiplies as its f32 value does).
pub(crate) trait Widen: Copy + Send + Sync {
    fn widen(self) -> f32;
}

impl Widen for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl Widen for bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
}

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
        let chunk = per_task(n.div_ceil(4 * pool)).max(16);
        by_rows(a, b, c, parallel.then_some(chunk), false, land, dot4, dot);
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

/// `x·Wᵀ` for one row x of K elements and W `[N, K]` stored in bf16 (a frozen weight kept in
/// half the bytes): c[j] is summed exactly as `gemv` sums it for the same weight widened to
/// f32 (`Widen`), so it has those bits, and reads half the bytes. Split over the threads as
/// `gemv` with no thread limit.
pub(super) fn gemv_bf16(a: &[f32], w: &[bf16], c: &mut [f32], n: usize, k: usize) {
    debug_assert!(a.len() >= k && w.len() >= k * n && c.len() >= n && n > 0 && k > 0);
    let (a, c) = (&a[..k], &mut c[..n]);
    let parallel = k * n * 2 >= PARALLEL_BYTES;
    let chunk = n.div_ceil(4 * rayon::current_num_threads().max(1)).max(16);
    by_rows(a, w, c, parallel.then_some(chunk), true, |ci, v| *ci = v, dot4_bf16, dot_bf16);
}

/// Four rows' dot products with x (`dot4`, `dot4_bf16`), prefetching the four after them when
/// given.
type Four<T> = fn(&[f32], [&[T]; 4], Option<&[T]>) -> [f32; 4];

/// c[j] = `land`(c[j], a·W[j]) for W `[c.len(), K]` by rows, four a pass with `four`, the
/// rest with `one`; in tasks of `chunk` rows when given, else on this thread. With `prefetch`
/// each pass asks for the next four rows' cache lines as it reads its own.
#[allow(clippy::too_many_arguments)]
fn by_rows<T: Widen>(
    a: &[f32],
    w: &[T],
    c: &mut [f32],
    chunk: Option<usize>,
    prefetch: bool,
    land: impl Fn(&mut f32, f32) + Sync,
    four: Four<T>,
    one: fn(&[f32], &[T]) -> f32,
) {
    let k = a.len();
    let rows = |(j0, cs): (usize, &mut [f32])| {
        let row = |j: usize| &w[j * k..][..k];
        let mut quads = cs.chunks_exact_mut(4);
        let mut j = j0;
        for q in &mut quads {
            let next = if prefetch { w.get((j + 4) * k..(j + 8) * k) } else { None };
            for (ci, v) in q.iter_mut().zip(four(a, [row(j), row(j + 1), row(j + 2), row(j + 3)], next)) {
                land(ci, v);
            }
            j += 4;
        }
        for ci in quads.into_remainder() {
            land(ci, one(a, row(j)));
            j += 1;
        }
    };
    match chunk {
        Some(chunk) => c.par_chunks_mut(chunk).enumerate().for_each(|(i, cs)| rows((i * chunk, cs))),
        None => rows((0, c)),
    }
}

wide! {
    /// `dot4` for rows in bf16 (each widened as it is read).
    fn dot4_bf16(a: &[f32], rows: [&[bf16]; 4], next: Option<&[bf16]>) -> [f32; 4] = dot4_lanes
}

wide! {
    /// `math::dot` of an f32 row with a bf16 row: the same lanes and order.
    fn dot_bf16(a: &[f32], row: &[bf16]) -> f32 = dot_lanes
}

/// `math::dot_lanes` for a row of any `Widen` type (the same operations, in the same order).
#[inline(always)]
fn dot_lanes<T: Widen>(a: &[f32], b: &[T]) -> f32 {
    let mut lanes = [0.0f32; 16];
    let (mut ca, mut cb) = (a.chunks_exact(16), b.chunks_exact(16));
    for (x, y) in (&mut ca).zip(&mut cb) {
        for ((l, &x), &y) in lanes.iter_mut().zip(x).zip(y) {
            *l += x * y.widen();
        }
    }
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y.widen()).sum();
    lanes.iter().sum::<f32>() + tail
}

wide! {
    /// The dot products of `a` with four rows, each summed as `math::dot` sums one (sixteen
    /// lanes, then in order), so with its bits: the four sums share a's loads, and their four
    /// chains of adds overlap where one row's would wait on each add (at K 576 that wait was as
    /// long as the row's loads). `next`, when given, holds the four rows after these, whose
    /// cache lines are asked for (prefetched) as the same offsets of these are read.
    fn dot4(a: &[f32], rows: [&[f32]; 4], next: Option<&[f32]>) -> [f32; 4] = dot4_lanes
}

#[inline(always)]
fn dot4_lanes<T: Widen>(a: &[f32], rows: [&[T]; 4], next: Option<&[T]>) -> [f32; 4] {
    let k = a.len();
    let [r0, r1, r2, r3] = rows.map(|r| &r[..k]);
    let (mut l0, mut l1, mut l2, mut l3) = ([0.0f32; 16], [0.0f32; 16], [0.0f32; 16], [0.0f32; 16]);
    // Zipped chunks, one accumulator per row: written with an array of rows indexed in the loop,
    // LLVM did not vectorise it (17 GiB/s against 57 at K 4096).
    let chunks = a.chunks_exact(16).zip(r0.chunks_exact(16)).zip(r1.chunks_exact(16)).zip(r2.chunks_exact(16)).zip(r3.chunks_exact(16));
    for (c, ((((x, y0), y1), y2), y3)) in chunks.enumerate() {
        if let Some(nx) = next {
            for r in 0..4 {
                prefetch(nx.as_ptr().wrapping_add(r * k + 16 * c));
            }
        }
        for i in 0..16 {
            l0[i] += x[i] * y0[i].widen();
            l1[i] += x[i] * y1[i].widen();
            l2[i] += x[i] * y2[i].widen();
            l3[i] += x[i] * y3[i].widen();
        }
    }
    let full = k - k % 16;
    let sum = |l: &[f32; 16], r: &[T]| l.iter().sum::<f32>() + a[full..].iter().zip(&r[full..]).map(|(x, y)| x * y.widen()).sum::<f32>();
    [sum(&l0, r0), sum(&l1, r1), sum(&l2, r2), sum(&l3, r3)]
}

/// Asks for the cache line holding `p`: a hint, which reads nothing the program sees and
/// does not fault on any address.
#[inline(always)]
fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch only hints the cache; it faults on no address.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p as *const i8)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
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
            let four = dot4(&a, rows, None);
            for (i, r) in rows.iter().enumerate() {
                assert_eq!(four[i].to_bits(), dot(&a, r).to_bits(), "k={k} row {i}");
            }
        }
    }

    #[test]
    fn a_bf16_weight_gives_the_bits_of_the_same_weight_in_f32() {
        // N with 1-3 rows past the last four, K past and below 16, W past the parallel
        // threshold (in bf16 bytes) and below it.
        for (n, k) in [(7, 5), (64, 1), (1502, 203), (33, 576)] {
            let mut rng = Rng::new(n as u64 + k as u64);
            let a = rng.vec(k, -1.0, 1.0);
            let w: Vec<bf16> = rng.vec(n * k, -1.0, 1.0).into_iter().map(bf16::from_f32).collect();
            let wide: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
            let mut c = vec![f32::NAN; n];
            gemv_bf16(&a, &w, &mut c, n, k);
            let mut want = vec![f32::NAN; n];
            gemv(&a, &wide, &mut want, MatmulParams { m: 1, n, k, trans_a: false, trans_b: true }, None, 0);
            assert!(c.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits()), "n={n} k={k}: {c:?} vs {want:?}");
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
