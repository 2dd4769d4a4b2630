//! Matrix product with transpose flags: `C[M,N] = op(A) · op(B)`, where `op(A)` is A `[M,K]`,
//! or Aᵀ with A stored `[K,M]` when `trans_a`; likewise B `[K,N]`, or `[N,K]` when `trans_b`.
//!
//! Backward of `C = A·B` (no transposes): `dA = dC·Bᵀ`, `dB = Aᵀ·dC`; with flags, the same
//! products with the flags carried through (see `ops::matmul`).
//! CPU fast path: the `gemm` crate (AVX-512 kernels chosen at run time), and for a single row
//! of A (decoding) `gemv`, split over the threads. GPU GEMM kernels are the LoRA-GEMM family's
//! job.

mod gemv;

/// Sizes and layout of one product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatmulParams {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
}

impl MatmulParams {
    /// (row stride, column stride) of A and B in elements.
    fn strides(&self) -> ((usize, usize), (usize, usize)) {
        let a = if self.trans_a { (1, self.m) } else { (self.k, 1) };
        let b = if self.trans_b { (1, self.k) } else { (self.n, 1) };
        (a, b)
    }
}

pub mod reference {
    use super::MatmulParams;

    /// The plain triple loop in f64, each element summed in k order; rows side by side (rayon),
    /// so the result does not depend on the thread count.
    pub fn matmul(a: &[f64], b: &[f64], p: MatmulParams) -> Vec<f64> {
        use rayon::prelude::*;
        let ((ars, acs), (brs, bcs)) = p.strides();
        let mut c = vec![0.0; p.m * p.n];
        c.par_chunks_mut(p.n.max(1)).enumerate().for_each(|(i, row)| {
            for (j, out) in row.iter_mut().enumerate() {
                let mut acc = 0.0;
                for l in 0..p.k {
                    acc += a[i * ars + l * acs] * b[l * brs + j * bcs];
                }
                *out = acc;
            }
        });
        c
    }
}

pub mod cpu {
    use super::MatmulParams;
    use crate::kernels::check_len;
    use crate::Result;

    thread_local! {
        /// Threads one product on this thread may use (0: all of rayon's).
        static GEMM_THREADS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    /// The limit [`with_gemm_threads`] set on this thread (0: none).
    pub fn gemm_threads() -> usize {
        GEMM_THREADS.get()
    }

    /// Runs `f` with the products it starts on this thread limited to `threads` threads (0:
    /// all). For callers that already run independent work on every core (the trainer's
    /// shards): a product split between cores that are busy anyway only adds synchronisation.
    pub fn with_gemm_threads<R>(threads: usize, f: impl FnOnce() -> R) -> R {
        let before = GEMM_THREADS.replace(threads);
        let r = f();
        GEMM_THREADS.set(before);
        r
    }

    /// The transpose `[cols, rows]` of a row-major `[rows, cols]` matrix. Each task writes 32
    /// rows of the output (32 columns of the input), 16 elements of each row at a time: a
    /// pass reads 16 input rows' 32-column pieces (two 64-byte lines each) and writes 32
    /// 64-byte runs. The output is written once, not zeroed first. Measured
    /// (`benches/kernels.rs`, transpose/cpu, the 2-core AVX-512 machine, medians), the two earlier
    /// transposes (this one in 32-column strips read row by row into a zeroed output; the
    /// SDDMM's in 32 × 32 tiles) and this one: 4096 × 4096 65 / 32.2 / 29.3 ms (a parallel
    /// copy of the bytes: 19.8 ms), 2048 × 1024 - / 1.64 / 0.95 ms, 512 × 1376 0.84 / 0.25 /
    /// 0.18 ms. Runs of 8 or 32 elements, and strips of 16 or 64 columns, were slower.
    pub fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
        use rayon::prelude::*;
        use std::mem::MaybeUninit;
        const B: usize = 16;
        const STRIP: usize = 32;
        assert_eq!(a.len(), rows * cols, "transpose: {} elements for [{rows}, {cols}]", a.len());
        let len = rows * cols;
        let mut out: Vec<f32> = Vec::with_capacity(len);
        if len > 0 {
            out.spare_capacity_mut()[..len].par_chunks_mut(STRIP * rows).enumerate().for_each(|(s, dst)| {
                let (c0, cn) = (s * STRIP, dst.len() / rows);
                for r0 in (0..rows).step_by(B) {
                    let rn = B.min(rows - r0);
                    for c in 0..cn {
                        let out = &mut dst[c * rows + r0..][..rn];
                        for (r, o) in out.iter_mut().enumerate() {
                            *o = MaybeUninit::new(a[(r0 + r) * cols + c0 + c]);
                        }
                    }
                }
            });
        }
        // SAFETY: the strips cover the output's `len` elements, and every block of a strip
        // writes each of its elements: output (c, r) for every column c of the strip and
        // every row r.
        unsafe { out.set_len(len) };
        out
    }

    /// `c = op(a)·op(b)`, overwriting c.
    pub fn matmul(a: &[f32], b: &[f32], c: &mut [f32], p: MatmulParams) -> Result<()> {
        gemm_into(a, b, c, p, None)
    }

    /// `c += beta·op(a)·op(b)`: accumulates into c, so a sum of products writes c once.
    pub fn matmul_acc(a: &[f32], b: &[f32], c: &mut [f32], p: MatmulParams, beta: f32) -> Result<()> {
        gemm_into(a, b, c, p, Some(beta))
    }

    /// `op(a)·op(b)` in a new vector, which the GEMM writes once (no zero-fill first; one row of
    /// a, the `gemv` path, fills a zeroed vector).
    pub fn matmul_new(a: &[f32], b: &[f32], p: MatmulParams) -> Result<Vec<f32>> {
        check(a, b, p.m * p.n, p)?;
        let len = p.m * p.n;
        if p.k == 0 || len == 0 {
            return Ok(vec![0.0; len]);
        }
        if p.m == 1 {
            let mut c = vec![0.0; len];
            super::gemv::gemv(a, b, &mut c, p, None, GEMM_THREADS.get());
            return Ok(c);
        }
        let mut c: Vec<f32> = Vec::with_capacity(len);
        // SAFETY: with `read_dst = false` the GEMM writes every one of the m·n elements of c
        // through the raw pointer and reads none, so all `len` elements are initialised before
        // `set_len`; the inputs were bounds-checked.
        unsafe {
            gemm_raw(a, b, c.as_mut_ptr(), p, None);
            c.set_len(len);
        }
        Ok(c)
    }

    /// `x·Wᵀ` `[M, N]` for x `[M, K]` and W `[N, K]` stored in bf16 (a frozen weight in half
    /// the bytes). Widening is exact, so this is the product of the same weight in f32.
    /// - One row goes through `gemv_bf16`, which reads W's bf16 bytes and gives the bits
    ///   `matmul_new` gives for W widened to f32.
    /// - More rows go by blocks of W's rows, side by side: each block is widened into a buffer
    ///   of at most `WIDE_BLOCK` bytes, which stays in cache, and multiplied on one thread.
    ///   Widening all of W first (a copy of W in f32 for the call, written to fresh pages),
    ///   a perplexity run over 60 short lines took 10.2 s against the f32 model's 4.5; with
    ///   these blocks (and `dyw_bf16`'s in the head's cross-entropy) 5.1 s.
    pub fn xwt_bf16(x: &[f32], w: &[half::bf16], m: usize, n: usize, k: usize) -> Result<Vec<f32>> {
        use super::gemv::Widen;
        use rayon::prelude::*;
        const WIDE_BLOCK: usize = 256 << 10;
        check_len("xwt_bf16", "x", x.len(), m * k)?;
        check_len("xwt_bf16", "w", w.len(), n * k)?;
        if m == 0 || n == 0 || k == 0 {
            return Ok(vec![0.0; m * n]);
        }
        if m == 1 {
            let mut c = vec![0.0; n];
            super::gemv::gemv_bf16(x, w, &mut c, n, k);
            return Ok(c);
        }
        let rows = (WIDE_BLOCK / (4 * k)).max(16);
        let blocks: Vec<Vec<f32>> = w
            .par_chunks(rows * k)
            .map(|wb| {
                let wide: Vec<f32> = wb.iter().map(|v| v.widen()).collect();
                with_gemm_threads(1, || matmul_new(x, &wide, MatmulParams { m, n: wb.len() / k, k, trans_a: false, trans_b: true }))
            })
            .collect::<Result<_>>()?;
        let mut c = vec![0.0f32; m * n];
        c.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
            for (b, cb) in blocks.iter().zip(row.chunks_mut(rows)) {
                cb.copy_from_slice(&b[i * cb.len()..][..cb.len()]);
            }
        });
        Ok(c)
    }

    /// `dy·W` `[M, K]` for dy `[M, N]` and W `[N, K]` stored in bf16 (the backward's dX through
    /// a frozen bf16 weight, the head's dX in the fused cross-entropy): W's rows a block at a
    /// time, widened into one buffer of at most `WIDE_SUM_BLOCK` bytes, each block's share
    /// `dy[:, block]·W[block]` added in block order by the threaded GEMM. No f32 copy of W
    /// is made (for Llama-3-8B's MLP weights one would be 235 MB a product).
    pub fn dyw_bf16(dy: &[f32], w: &[half::bf16], m: usize, n: usize, k: usize) -> Result<Vec<f32>> {
        use super::gemv::Widen;
        const WIDE_SUM_BLOCK: usize = 1 << 20;
        check_len("dyw_bf16", "dy", dy.len(), m * n)?;
        check_len("dyw_bf16", "w", w.len(), n * k)?;
        let mut c = vec![0.0f32; m * k];
        if m == 0 || k == 0 {
            return Ok(c);
        }
        let rows = (WIDE_SUM_BLOCK / (4 * k)).max(16);
        let mut wide = Vec::with_capacity(rows.min(n) * k);
        for (i, wb) in w.chunks(rows * k).enumerate() {
            let nb = wb.len() / k;
            wide.clear();
            wide.extend(wb.iter().map(|v| v.widen()));
            let a = View { data: &dy[i * rows..], rows: m, cols: nb, rs: n, cs: 1 };
            let b = View { data: &wide, rows: nb, cols: k, rs: k, cs: 1 };
            gemm_view_into(a, b, &mut c, k, i > 0);
        }
        Ok(c)
    }

    /// bf16 values widened to f32 (exact), split over the threads.
    pub fn widen_bf16(w: &[half::bf16]) -> Vec<f32> {
        use super::gemv::Widen;
        use rayon::prelude::*;
        w.par_iter().map(|&v| v.widen()).collect()
    }

    fn check(a: &[f32], b: &[f32], c_len: usize, p: MatmulParams) -> Result<()> {
        check_len("matmul", "a", a.len(), p.m * p.k)?;
        check_len("matmul", "b", b.len(), p.k * p.n)?;
        check_len("matmul", "c", c_len, p.m * p.n)
    }

    fn gemm_into(a: &[f32], b: &[f32], c: &mut [f32], p: MatmulParams, acc: Option<f32>) -> Result<()> {
        check(a, b, c.len(), p)?;
        if p.m == 0 || p.n == 0 {
            return Ok(());
        }
        if p.k == 0 {
            if acc.is_none() {
                c[..p.m * p.n].fill(0.0);
            }
            return Ok(());
        }
        if p.m == 1 {
            super::gemv::gemv(a, b, c, p, acc, GEMM_THREADS.get());
            return Ok(());
        }
        // SAFETY: lengths checked above.
        unsafe { gemm_raw(a, b, c.as_mut_ptr(), p, acc) };
        Ok(())
    }

    /// # Safety
    /// `c` must be valid for writes of `m·n` elements (and reads, with `acc`); a and b must
    /// hold `m·k` and `k·n` elements; m, n, k > 0.
    unsafe fn gemm_raw(a: &[f32], b: &[f32], c: *mut f32, p: MatmulParams, acc: Option<f32>) {
        let ((ars, acs), (brs, bcs)) = p.strides();
        // Threads pay off only above ~1 MFLOP; below that a call costs more in scheduling.
        let flops = 2 * p.m * p.n * p.k;
        let threads = GEMM_THREADS.get();
        let par = if flops < 1 << 20 || threads == 1 { gemm::Parallelism::None } else { gemm::Parallelism::Rayon(threads) };
        gemm::gemm(
            p.m,
            p.n,
            p.k,
            c,
            1,
            p.n as isize,
            acc.is_some(),
            a.as_ptr(),
            acs as isize,
            ars as isize,
            b.as_ptr(),
            bcs as isize,
            brs as isize,
            if acc.is_some() { 1.0 } else { 0.0 },
            acc.unwrap_or(1.0),
            false,
            false,
            false,
            par,
        );
    }

    /// `c = a·b` (or `c += a·b` with `accumulate`) for strided views, c `[a.rows, b.cols]`
    /// with row stride `c_rs` (a block of columns of a wider matrix), threaded as `matmul`.
    pub fn gemm_view_into(a: View<'_>, b: View<'_>, c: &mut [f32], c_rs: usize, accumulate: bool) {
        let threads = GEMM_THREADS.get();
        let work = 2 * a.rows * a.cols * b.cols;
        let par = if work < 1 << 20 || threads == 1 { gemm::Parallelism::None } else { gemm::Parallelism::Rayon(threads) };
        gemm_views(a, b, c, c_rs, 1.0, accumulate, par);
    }

    /// `c = beta·a·b` (or `c += beta·a·b` with `accumulate`) for strided views, c row-major
    /// `[a.rows, b.cols]`; single-threaded, for callers that parallelise over heads.
    pub fn gemm_strided(a: View<'_>, b: View<'_>, c: &mut [f32], beta: f32, accumulate: bool) {
        gemm_views(a, b, c, b.cols, beta, accumulate, gemm::Parallelism::None);
    }

    /// The bounds-checked `gemm::gemm` call of [`gemm_view_into`] and [`gemm_strided`].
    fn gemm_views(a: View<'_>, b: View<'_>, c: &mut [f32], c_rs: usize, beta: f32, accumulate: bool, par: gemm::Parallelism) {
        let (m, k, n) = (a.rows, a.cols, b.cols);
        assert!(a.fits() && b.fits() && b.rows == k && n <= c_rs && (m == 0 || (m - 1) * c_rs + n <= c.len()), "gemm: views out of bounds");
        if m == 0 || n == 0 {
            return;
        }
        if k == 0 {
            if !accumulate {
                c.chunks_mut(c_rs).take(m).for_each(|row| row[..n].fill(0.0));
            }
            return;
        }
        // SAFETY: every index the views and c can reach was bounds-checked above.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                c.as_mut_ptr(),
                1,
                c_rs as isize,
                accumulate,
                a.data.as_ptr(),
                a.cs as isize,
                a.rs as isize,
                b.data.as_ptr(),
                b.cs as isize,
                b.rs as isize,
                if accumulate { 1.0 } else { 0.0 },
                beta,
                false,
                false,
                false,
                par,
            );
        }
    }

    /// A strided matrix view: element (i, j) is `data[i * rs + j * cs]`.
    #[derive(Clone, Copy)]
    pub struct View<'a> {
        pub data: &'a [f32],
        pub rows: usize,
        pub cols: usize,
        pub rs: usize,
        pub cs: usize,
    }

    impl View<'_> {
        fn fits(&self) -> bool {
            self.rows == 0 || self.cols == 0 || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{cpu, reference, MatmulParams};
    use crate::testing::{compare, Rng, Tolerance};

    /// `xwt_bf16` and `dyw_bf16` against the f64 products of the widened weight: one row, a
    /// few rows over W in several blocks (the last one short), and empty shapes.
    #[test]
    fn products_with_a_bf16_weight_match_its_f32_values() {
        use half::bf16;
        let mut rng = Rng::new(12);
        let f64v = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
        // K 203: blocks of 322 rows, so N 1000 is four blocks.
        for (m, n, k) in [(1, 1000, 203), (3, 1000, 203), (17, 40, 7), (2, 5, 300)] {
            let x = rng.vec(m * k, -1.0, 1.0);
            let w: Vec<bf16> = rng.vec(n * k, -1.0, 1.0).into_iter().map(bf16::from_f32).collect();
            let wide: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
            let want = reference::matmul(&f64v(&x), &f64v(&wide), MatmulParams { m, n, k, trans_a: false, trans_b: true });
            compare(&format!("xwt_bf16 m={m} n={n} k={k}"), &cpu::xwt_bf16(&x, &w, m, n, k).unwrap(), &want, Tolerance::F32).unwrap();
        }
        // dy·W by blocks of W's rows: K 203 makes blocks of 1,291 rows, so N 3000 is three.
        for (m, n, k) in [(3, 3000, 203), (1, 7, 5), (5, 0, 4)] {
            let dy = rng.vec(m * n, -1.0, 1.0);
            let w: Vec<bf16> = rng.vec(n * k, -1.0, 1.0).into_iter().map(bf16::from_f32).collect();
            let wide: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
            let want = reference::matmul(&f64v(&dy), &f64v(&wide), MatmulParams { m, n: k, k: n, trans_a: false, trans_b: false });
            compare(&format!("dyw_bf16 m={m} n={n} k={k}"), &cpu::dyw_bf16(&dy, &w, m, n, k).unwrap(), &want, Tolerance::F32).unwrap();
        }
        assert_eq!(cpu::xwt_bf16(&[], &[], 0, 4, 0).unwrap(), Vec::<f32>::new());
        assert_eq!(cpu::xwt_bf16(&[0.0; 6], &[], 3, 0, 2).unwrap(), Vec::<f32>::new());
        assert!(cpu::xwt_bf16(&[0.0; 5], &[bf16::ZERO; 6], 3, 2, 2).unwrap_err().to_string().contains("x"));
    }

    /// One row of a through the public products (`matmul`, `matmul_acc`, `matmul_new`), which
    /// send it to `gemv`: every transpose flag, an output longer than the product (only its
    /// first n elements change), an overwrite of NaNs, an accumulation with beta.
    #[test]
    fn one_row_products_go_through_gemv_with_every_flag() {
        let (n, k) = (300, 37);
        let mut rng = Rng::new(11);
        let (a, b) = (rng.vec(k, -1.0, 1.0), rng.vec(k * n, -1.0, 1.0));
        let f64v = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
        for (trans_a, trans_b) in [(false, false), (true, false), (false, true), (true, true)] {
            let p = MatmulParams { m: 1, n, k, trans_a, trans_b };
            let want = reference::matmul(&f64v(&a), &f64v(&b), p);
            let what = format!("m=1 ta={trans_a} tb={trans_b}");
            let mut c = vec![f32::NAN; n + 5];
            cpu::matmul(&a, &b, &mut c, p).unwrap();
            compare(&what, &c[..n], &want, Tolerance::F32).unwrap();
            assert!(c[n..].iter().all(|v| v.is_nan()), "{what}: wrote past n");
            compare(&format!("{what} (new)"), &cpu::matmul_new(&a, &b, p).unwrap(), &want, Tolerance::F32).unwrap();
            let c0 = rng.vec(n, -1.0, 1.0);
            let mut c = c0.clone();
            cpu::matmul_acc(&a, &b, &mut c, p, -0.5).unwrap();
            let acc: Vec<f64> = c0.iter().zip(&want).map(|(&c, &v)| c as f64 - 0.5 * v).collect();
            compare(&format!("{what} (acc)"), &c, &acc, Tolerance::F32).unwrap();
        }
    }

    #[test]
    fn transpose_matches_the_plain_loop_on_ragged_shapes() {
        for (rows, cols) in [(0, 5), (5, 0), (1, 1), (1, 37), (37, 1), (17, 65), (130, 33), (64, 128)] {
            let a: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
            let t = super::cpu::transpose(&a, rows, cols);
            let want: Vec<f32> = (0..cols).flat_map(|c| (0..rows).map(move |r| (r * cols + c) as f32)).collect();
            assert_eq!(t, want, "transpose of [{rows}, {cols}]");
        }
    }
}

