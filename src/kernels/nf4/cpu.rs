//! The CPU's NF4: quantize and dequantize in bitsandbytes' format, and the QLoRA products
//! with W decoded inside them (`matmul_xwt`, `matmul_dyw`): a tile at a time for up to 64 rows
//! of x or dy (in registers on an AVX-512 CPU for up to 16 rows of x and 32 of dy: `direct`),
//! 512 rows of W at a time past 64 rows, whole only where K is not a multiple of 64.

use rayon::prelude::*;

use super::*;
#[cfg(target_arch = "x86_64")]
use crate::kernels::math::avx512;

/// Quantizes `w` (flattened) to NF4 with double quantization.
pub fn quantize(w: &[f32]) -> Nf4Tensor {
    let (codes, absmax) = quantize_blocks(w, &NF4, BLOCK);
    let packed: Vec<u8> = codes.chunks(2).map(|p| (p[0] << 4) | p.get(1).copied().unwrap_or(0)).collect();
    double_quantize(w.len(), packed, &absmax)
}

/// The f32 absmax of every 64-block.
pub fn absmax(q: &Nf4Tensor) -> Vec<f32> {
    let map = dynamic_map();
    q.absmax.iter().enumerate().map(|(b, &i)| map[i as usize] * q.absmax2[b / BLOCK2] + q.offset).collect()
}

/// The values of one block: `out[2i]`, `out[2i + 1]` from byte i of `codes` (high nibble
/// first), times the block's absmax `a` (through the 16 code values scaled once: the same
/// single rounding of `code · a`).
#[inline]
fn decode_block(codes: &[u8], a: f32, out: &mut [f32]) {
    let lut: [f32; 16] = NF4.map(|v| v * a);
    if let (Ok(codes), Ok(out)) = (<&[u8; BLOCK / 2]>::try_from(codes), <&mut [f32; BLOCK]>::try_from(&mut *out)) {
        #[cfg(target_arch = "x86_64")]
        if avx512() {
            // SAFETY: the CPU has AVX-512F (checked once above).
            unsafe { decode_block_avx512(codes, &lut, out) };
            return;
        }
        decode_whole_block(codes, &lut, out);
        return;
    }
    for (pair, &byte) in out.chunks_mut(2).zip(codes) {
        pair[0] = lut[(byte >> 4) as usize];
        if let Some(v) = pair.get_mut(1) {
            *v = lut[(byte & 0xf) as usize];
        }
    }
}

/// A whole block from its scaled table: fixed sizes, no bounds checks in the loop.
#[inline]
fn decode_whole_block(codes: &[u8; BLOCK / 2], lut: &[f32; 16], out: &mut [f32; BLOCK]) {
    for (i, &byte) in codes.iter().enumerate() {
        out[2 * i] = lut[(byte >> 4) as usize];
        out[2 * i + 1] = lut[(byte & 0xf) as usize];
    }
}


/// [`decode_whole_block`] with AVX-512, the same values: 16 bytes of codes widened to 16
/// lanes, their high and low nibbles looked up in the 16-entry table by one permute each,
/// and the two results interleaved (high nibble first) into 32 outputs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn decode_block_avx512(codes: &[u8; BLOCK / 2], lut: &[f32; 16], out: &mut [f32; BLOCK]) {
    use std::arch::x86_64::*;
    let w = decode64_avx512(codes.as_ptr(), _mm512_loadu_ps(lut.as_ptr()));
    for (j, v) in w.into_iter().enumerate() {
        _mm512_storeu_ps(out.as_mut_ptr().add(16 * j), v);
    }
}

/// The 64 weights of one block (32 bytes of codes at `codes`) as four registers, in order, from
/// the block's scaled table: 16 bytes at a time widened to 16 lanes, the high and the low nibbles
/// looked up by one permute each, and the two interleaved (high nibble first).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn decode64_avx512(codes: *const u8, table: std::arch::x86_64::__m512) -> [std::arch::x86_64::__m512; 4] {
    use std::arch::x86_64::*;
    let low4 = _mm512_set1_epi32(0xf);
    // Lane j of the first output takes element j/2 of hi (even j) or of lo (odd j, index
    // 16 + j/2 of the pair); the second output the same from element 8 on.
    let first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    let second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    let mut w = [_mm512_setzero_ps(); 4];
    for half in 0..2 {
        let wide = _mm512_cvtepu8_epi32(_mm_loadu_si128(codes.add(16 * half) as *const __m128i));
        let hi = _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(wide), table);
        let lo = _mm512_permutexvar_ps(_mm512_and_si512(wide, low4), table);
        w[2 * half] = _mm512_permutex2var_ps(hi, first, lo);
        w[2 * half + 1] = _mm512_permutex2var_ps(hi, second, lo);
    }
    w
}

/// Writes the dequantized tensor into `out` (`q.len` elements), blocks in parallel.
pub fn dequantize_into(q: &Nf4Tensor, out: &mut [f32]) -> crate::Result<()> {
    q.validate()?;
    crate::kernels::check_len("nf4 dequantize", "out", out.len(), q.len)?;
    decode_blocks_into(q, &absmax(q), 0, &mut out[..q.len]);
    Ok(())
}

/// The values of the blocks from `first` on into `out` (as many as it holds, the last block
/// possibly partial), in parallel: a block of 64 is 32 whole bytes, so block b's codes start
/// at byte 32b.
fn decode_blocks_into(q: &Nf4Tensor, scales: &[f32], first: usize, out: &mut [f32]) {
    let codes = &q.packed[first * BLOCK / 2..];
    out.par_chunks_mut(BLOCK).zip(codes.par_chunks(BLOCK / 2)).zip(scales[first..].par_iter()).for_each(|((o, codes), &a)| decode_block(codes, a, o));
}

/// Up to this many rows of x (decoding, small batches), the NF4 products decode W a tile at a
/// time inside the product; above it, `PANEL_ROWS` rows of W at a time, a GEMM on each (the
/// tiled form would repack x for every tile).
pub const TILED_MAX_ROWS: usize = 64;

/// Rows of W the NF4 products decode at a time past `TILED_MAX_ROWS` rows of x or dy (K a
/// multiple of 64): one buffer of 512 · K values a call (`[K, 512]` transposed for x·Wᵀ,
/// `[512, K]` for dy·W; 8 MiB at K 4096), never W whole (decoding a 4096 x 4096 W into a
/// fresh 64 MiB cost more in page faults than in decoding).
pub const PANEL_ROWS: usize = 512;

/// Up to this many rows of x, `matmul_xwt` on an AVX-512 CPU runs `direct::xwt` (no GEMM).
pub const DIRECT_MAX_ROWS: usize = 16;

/// Up to this many rows of dy, `matmul_dyw` on an AVX-512 CPU runs `direct::dyw` (no GEMM). It
/// decodes each block once per 6 rows of dy where the tiled GEMM decodes it once, so its lead
/// shrinks with the rows: measured 1.1x faster than the tiled GEMM at 32 rows, even at 64.
pub const DIRECT_DYW_MAX_ROWS: usize = 32;

/// The NF4 products for a few rows without a GEMM (decoding, small batches), W decoded in
/// registers: `xwt` (`y = x·Wᵀ`): each task takes 64 rows of W and, K 512 at a time (x's
/// slice stays in L1), decodes 64 weights of a row into four registers and multiplies them
/// into one accumulator per row of x; `dyw` (`dx = dy·W`, see there). Each output is summed
/// in a fixed order whatever the threads.
#[cfg(target_arch = "x86_64")]
mod direct {
    use std::arch::x86_64::*;

    use rayon::prelude::*;

    use super::{Nf4Tensor, BLOCK, NF4};

    const ROWS: usize = 64;
    const KC: usize = 512;

    /// `y = x·Wᵀ` (`k` a multiple of 64, `m` at most 16; the caller checked AVX-512F).
    pub(super) fn xwt(q: &Nf4Tensor, scales: &[f32], x: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        assert!(k.is_multiple_of(BLOCK) && (1..=16).contains(&m) && x.len() >= m * k && q.len == n * k, "xwt: W [{n}, {k}] in blocks of 64, x [{m}, {k}]");
        // yt: [n, m], 64 rows of W (outputs) a task.
        let mut yt = vec![0.0f32; n * m];
        yt.par_chunks_mut(ROWS * m).enumerate().for_each(|(t, out)| {
            let r0 = t * ROWS;
            macro_rules! rows {
                ($($m:literal)*) => {
                    match m {
                        // SAFETY: the caller checked AVX-512F; x holds m·k values, W n·k
                        // codes, `out` the outputs of rows r0.. of W.
                        $($m => unsafe { task::<$m>(q, scales, x, k, r0, out) },)*
                        _ => unreachable!("xwt takes 1 to 16 rows of x"),
                    }
                };
            }
            rows!(1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16);
        });
        let mut y = vec![0.0f32; m * n];
        for (r, col) in yt.chunks(m).enumerate() {
            for (i, &v) in col.iter().enumerate() {
                y[i * n + r] = v;
            }
        }
        y
    }

    /// Rows of dY a [`dyw`] pass carries: 4 accumulators each, beside W's 4 registers and the
    /// broadcast dY value, within the 32 vector registers.
    const DY_ROWS: usize = 6;
    /// 64-column blocks of W a [`dyw`] task takes: two blocks share each 64-byte line of codes,
    /// and four make 128 contiguous bytes a row (measured: 1.1x faster than two at N 14336).
    const DY_BLOCKS: usize = 4;
    /// Rows of W a [`dyw`] pass walks before the next pass over the same rows: their codes
    /// (128 KB) stay in L2 for every block and group of dy rows of the task.
    const W_ROWS: usize = 1024;

    /// `dx = dy·W` for a few rows of dy (`k` a multiple of 64; the caller checked AVX-512F):
    /// each task takes four 64-column blocks of W and walks
    /// down W's rows, 1024 at a time; per block and per (up to `DY_ROWS`) rows of dy, each row
    /// r's block is decoded into four registers and multiplied by the broadcast `dy[i, r]` into
    /// four accumulators per row of dy, kept in the output between the 1024-row steps. Each
    /// output is summed over r in order, whatever the threads.
    pub(super) fn dyw(q: &Nf4Tensor, scales: &[f32], dy: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        assert!(k.is_multiple_of(BLOCK) && dy.len() >= m * n && q.len == n * k, "dyw: W [{n}, {k}] in blocks of 64, dy [{m}, {n}]");
        // blocks: [k / 64][m][64], the 64 columns of block kb for every row of dy.
        let mut blocks = vec![0.0f32; k * m];
        blocks.par_chunks_mut(DY_BLOCKS * m * BLOCK).enumerate().for_each(|(t, task)| {
            for r0 in (0..n).step_by(W_ROWS) {
                let rows = W_ROWS.min(n - r0);
                for (b, out) in task.chunks_mut(m * BLOCK).enumerate() {
                    let kb = t * DY_BLOCKS + b;
                    for (g, o) in out.chunks_mut(DY_ROWS * BLOCK).enumerate() {
                        let i0 = g * DY_ROWS;
                        macro_rules! rows {
                            ($($m:literal)*) => {
                                match o.len() / BLOCK {
                                    // SAFETY: the caller checked AVX-512F; dy holds m·n values,
                                    // W n·k codes, `o` the outputs of rows i0.. of dy in block kb.
                                    $($m => unsafe { dyw_pass::<$m>(q, scales, dy, (n, k), kb, i0, (r0, rows), o) },)*
                                    _ => unreachable!("a pass takes 1 to DY_ROWS rows of dy"),
                                }
                            };
                        }
                        rows!(1 2 3 4 5 6);
                    }
                }
            }
        });
        let mut dx = vec![0.0f32; m * k];
        dx.par_chunks_mut(k).enumerate().for_each(|(i, row)| {
            for (kb, dst) in row.chunks_mut(BLOCK).enumerate() {
                dst.copy_from_slice(&blocks[(kb * m + i) * BLOCK..][..BLOCK]);
            }
        });
        dx
    }

    /// Adds rows r0..r0 + rows of W's block kb, times dy's rows i0..i0 + R, to `out` (`[R][64]`).
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn dyw_pass<const R: usize>(q: &Nf4Tensor, scales: &[f32], dy: &[f32], (n, k): (usize, usize), kb: usize, i0: usize, (r0, rows): (usize, usize), out: &mut [f32]) {
        let per_row = k / BLOCK;
        let nf4 = _mm512_loadu_ps(NF4.as_ptr());
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        for (i, a) in acc.iter_mut().enumerate() {
            for (j, aj) in a.iter_mut().enumerate() {
                *aj = _mm512_loadu_ps(out.as_ptr().add(i * BLOCK + 16 * j));
            }
        }
        for r in r0..r0 + rows {
            let b = r * per_row + kb;
            let table = _mm512_mul_ps(nf4, _mm512_set1_ps(*scales.get_unchecked(b)));
            let w = super::decode64_avx512(q.packed.as_ptr().add(b * BLOCK / 2), table);
            for (i, a) in acc.iter_mut().enumerate() {
                let d = _mm512_set1_ps(*dy.get_unchecked((i0 + i) * n + r));
                for (aj, wj) in a.iter_mut().zip(w) {
                    *aj = _mm512_fmadd_ps(wj, d, *aj);
                }
            }
        }
        for (i, a) in acc.iter().enumerate() {
            for (j, aj) in a.iter().enumerate() {
                _mm512_storeu_ps(out.as_mut_ptr().add(i * BLOCK + 16 * j), *aj);
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn task<const M: usize>(q: &Nf4Tensor, scales: &[f32], x: &[f32], k: usize, r0: usize, out: &mut [f32]) {
        let per_row = k / BLOCK;
        let nf4 = _mm512_loadu_ps(NF4.as_ptr());
        let rows = out.len() / M;
        for k0 in (0..k).step_by(KC) {
            let k1 = (k0 + KC).min(k);
            for (dr, o) in out.chunks_mut(M).enumerate().take(rows) {
                let r = r0 + dr;
                let mut acc = [_mm512_setzero_ps(); M];
                for kb in k0 / BLOCK..k1 / BLOCK {
                    let b = r * per_row + kb;
                    // The scaled table as the scalar decode makes it: NF4[c] · a, one rounding.
                    let table = _mm512_mul_ps(nf4, _mm512_set1_ps(*scales.get_unchecked(b)));
                    let w = super::decode64_avx512(q.packed.as_ptr().add(b * BLOCK / 2), table);
                    let kk = kb * BLOCK;
                    for (i, a) in acc.iter_mut().enumerate() {
                        let xr = x.as_ptr().add(i * k + kk);
                        for (j, wj) in w.iter().enumerate() {
                            *a = _mm512_fmadd_ps(*wj, _mm512_loadu_ps(xr.add(16 * j)), *a);
                        }
                    }
                }
                for (oi, a) in o.iter_mut().zip(acc) {
                    *oi += _mm512_reduce_add_ps(a);
                }
            }
        }
    }
}

/// `y = x·Wᵀ` (`x` `[m, k]`, W `[n, k]` in NF4, `y` `[m, n]`): for `m <= TILED_MAX_ROWS`
/// and `k` a multiple of 64, each task decodes 64 rows of W into a buffer of its own and
/// multiplies x by it, so W is never decoded whole (decoding a 4096 × 4096 W whole costs
/// more than the product at m = 1: most of it page faults on the fresh 64 MiB); for more rows
/// `PANEL_ROWS` rows of W are decoded (transposed) at a time and the GEMM runs on each (W is
/// decoded whole only where `k` is not a multiple of 64). For `m <= DIRECT_MAX_ROWS` on an AVX-512
/// CPU, `direct` decodes W in registers instead of tiles. Within rounding of the f32 W's
/// product (each form sums in its own order).
pub fn matmul_xwt(q: &Nf4Tensor, x: &[f32], m: usize, n: usize, k: usize) -> crate::Result<Vec<f32>> {
    use crate::kernels::matmul::cpu::{gemm_strided, gemm_view_into, matmul_new, View};
    use crate::kernels::matmul::MatmulParams;
    check_matrix(q, x, m, n, k, "x")?;
    if m == 0 || n == 0 || k == 0 {
        return Ok(vec![0.0; m * n]);
    }
    if !k.is_multiple_of(BLOCK) {
        return matmul_new(&x[..m * k], &dequantize_transposed(q, n, k)?, MatmulParams { m, n, k, trans_a: false, trans_b: false });
    }
    let (scales, per_row) = (absmax(q), k / BLOCK);
    if m > TILED_MAX_ROWS {
        // PANEL_ROWS rows of W at a time, decoded transposed into one buffer, each product
        // written straight into its columns of y.
        let mut y = vec![0.0f32; m * n];
        let mut panel = vec![0.0f32; k * PANEL_ROWS.min(n)];
        for r0 in (0..n).step_by(PANEL_ROWS) {
            let rn = PANEL_ROWS.min(n - r0);
            decode_transposed_into(q, &scales, (r0, rn), k, &mut panel[..k * rn]);
            gemm_view_into(View { data: &x[..m * k], rows: m, cols: k, rs: k, cs: 1 }, View { data: &panel[..k * rn], rows: k, cols: rn, rs: rn, cs: 1 }, &mut y[r0..], n, false);
        }
        return Ok(y);
    }
    #[cfg(target_arch = "x86_64")]
    if m <= DIRECT_MAX_ROWS && avx512() {
        return Ok(direct::xwt(q, &scales, &x[..m * k], m, n, k));
    }
    const TILE: usize = 64;
    let tiles: Vec<Vec<f32>> = (0..n.div_ceil(TILE))
        .into_par_iter()
        .map_init(
            || vec![0.0f32; TILE * k],
            |buf, t| {
                let (r0, rn) = (t * TILE, TILE.min(n - t * TILE));
                for (i, row) in buf.chunks_mut(k).take(rn).enumerate() {
                    for (kb, out) in row.chunks_mut(BLOCK).enumerate() {
                        let b = (r0 + i) * per_row + kb;
                        decode_block(&q.packed[b * BLOCK / 2..][..BLOCK / 2], scales[b], out);
                    }
                }
                let mut out = vec![0.0f32; m * rn];
                // B = this tile of W read transposed: [k, rn] with stride k between columns.
                gemm_strided(View { data: &x[..m * k], rows: m, cols: k, rs: k, cs: 1 }, View { data: &buf[..rn * k], rows: k, cols: rn, rs: 1, cs: k }, &mut out, 1.0, false);
                out
            },
        )
        .collect();
    let mut y = vec![0.0f32; m * n];
    y.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
        for (t, tile) in tiles.iter().enumerate() {
            let (r0, rn) = (t * TILE, TILE.min(n - t * TILE));
            row[r0..r0 + rn].copy_from_slice(&tile[i * rn..(i + 1) * rn]);
        }
    });
    Ok(y)
}

/// `dx = dy·W` (`dy` `[m, n]`, W `[n, k]` in NF4, `dx` `[m, k]`), the backward's product:
/// for `m <= TILED_MAX_ROWS` and `k` a multiple of 64, each task decodes one 64-column
/// block of every row of W and multiplies dy by it; for more rows `PANEL_ROWS` rows of W at a
/// time, each panel's product added into dx (W whole only where `k` is not a multiple of 64). For
/// `m <= DIRECT_DYW_MAX_ROWS` on an AVX-512 CPU, `direct::dyw` decodes W in registers instead.
pub fn matmul_dyw(q: &Nf4Tensor, dy: &[f32], m: usize, n: usize, k: usize) -> crate::Result<Vec<f32>> {
    use crate::kernels::matmul::cpu::{gemm_strided, gemm_view_into, matmul_new, View};
    use crate::kernels::matmul::MatmulParams;
    check_matrix(q, dy, m, n, k, "dy")?;
    if m == 0 || n == 0 || k == 0 {
        return Ok(vec![0.0; m * k]);
    }
    if !k.is_multiple_of(BLOCK) {
        return matmul_new(&dy[..m * n], &dequantize(q)?, MatmulParams { m, n: k, k: n, trans_a: false, trans_b: false });
    }
    let (scales, per_row) = (absmax(q), k / BLOCK);
    if m > TILED_MAX_ROWS {
        // PANEL_ROWS rows of W at a time (whole blocks, in order), each panel's product
        // added into dx.
        let mut dx = vec![0.0f32; m * k];
        let mut panel = vec![0.0f32; k * PANEL_ROWS.min(n)];
        for r0 in (0..n).step_by(PANEL_ROWS) {
            let rn = PANEL_ROWS.min(n - r0);
            decode_blocks_into(q, &scales, r0 * per_row, &mut panel[..k * rn]);
            let dyv = View { data: &dy[r0..m * n], rows: m, cols: rn, rs: n, cs: 1 };
            gemm_view_into(dyv, View { data: &panel[..k * rn], rows: rn, cols: k, rs: k, cs: 1 }, &mut dx, k, r0 > 0);
        }
        return Ok(dx);
    }
    #[cfg(target_arch = "x86_64")]
    if m <= DIRECT_DYW_MAX_ROWS && avx512() {
        return Ok(direct::dyw(q, &scales, &dy[..m * n], m, n, k));
    }
    let tiles: Vec<Vec<f32>> = (0..per_row)
        .into_par_iter()
        .map_init(
            || vec![0.0f32; n * BLOCK],
            |buf, kb| {
                for (r, out) in buf.chunks_mut(BLOCK).enumerate() {
                    let b = r * per_row + kb;
                    decode_block(&q.packed[b * BLOCK / 2..][..BLOCK / 2], scales[b], out);
                }
                let mut out = vec![0.0f32; m * BLOCK];
                gemm_strided(View { data: &dy[..m * n], rows: m, cols: n, rs: n, cs: 1 }, View { data: buf, rows: n, cols: BLOCK, rs: BLOCK, cs: 1 }, &mut out, 1.0, false);
                out
            },
        )
        .collect();
    let mut dx = vec![0.0f32; m * k];
    dx.par_chunks_mut(k).enumerate().for_each(|(i, row)| {
        for (kb, tile) in tiles.iter().enumerate() {
            row[kb * BLOCK..(kb + 1) * BLOCK].copy_from_slice(&tile[i * BLOCK..(i + 1) * BLOCK]);
        }
    });
    Ok(dx)
}

/// W is `[n, k]` and `a` (named `what`) holds at least `m` rows of the product's inner length.
fn check_matrix(q: &Nf4Tensor, a: &[f32], m: usize, n: usize, k: usize, what: &str) -> crate::Result<()> {
    q.validate()?;
    if n * k != q.len {
        return Err(crate::Error::InvalidArgument(format!("nf4 product: W [{n}, {k}] for {} elements", q.len)));
    }
    let inner = if what == "x" { k } else { n };
    if a.len() < m * inner {
        return Err(crate::Error::InvalidArgument(format!("nf4 product: {what} has {} elements, [{m}, {inner}] needs {}", a.len(), m * inner)));
    }
    Ok(())
}

/// The dequantized `[rows, cols]` matrix, transposed (`[cols, rows]`), in one pass: what the
/// CPU's GEMM reads for `x·Wᵀ`. Where `cols` is a multiple of 64, each task decodes one
/// 64-column block of every row into a tile and writes its 64 output rows whole;
/// elsewhere, the dequantized matrix is transposed.
pub fn dequantize_transposed(q: &Nf4Tensor, rows: usize, cols: usize) -> crate::Result<Vec<f32>> {
    q.validate()?;
    if rows * cols != q.len {
        return Err(crate::Error::InvalidArgument(format!("nf4 dequantize: [{rows}, {cols}] for {} elements", q.len)));
    }
    if rows == 0 || cols == 0 {
        return Ok(Vec::new());
    }
    if !cols.is_multiple_of(BLOCK) {
        return Ok(crate::kernels::matmul::cpu::transpose(&dequantize(q)?, rows, cols));
    }
    let mut out = vec![0.0f32; q.len];
    decode_transposed_into(q, &absmax(q), (0, rows), cols, &mut out);
    Ok(out)
}

/// Rows `row0..row0 + rows` of the dequantized `[.., cols]` matrix (`cols` a multiple of 64),
/// transposed into `out` (`[cols, rows]`): task kb writes output rows 64kb..64kb+64 (input
/// columns) from block kb of each row, 64 rows of the input at a time through a
/// `[64 rows][64 columns]` tile.
fn decode_transposed_into(q: &Nf4Tensor, scales: &[f32], (row0, rows): (usize, usize), cols: usize, out: &mut [f32]) {
    debug_assert!(cols.is_multiple_of(BLOCK), "decode_transposed_into: {cols} columns, not whole blocks of 64");
    let per_row = cols / BLOCK;
    out[..rows * cols].par_chunks_mut(BLOCK * rows).enumerate().for_each(|(kb, dst)| {
        let mut tile = [[0.0f32; BLOCK]; BLOCK];
        for r0 in (0..rows).step_by(BLOCK) {
            let rn = BLOCK.min(rows - r0);
            for (i, t) in tile.iter_mut().enumerate().take(rn) {
                let b = (row0 + r0 + i) * per_row + kb;
                decode_block(&q.packed[b * BLOCK / 2..][..BLOCK / 2], scales[b], t);
            }
            for j in 0..BLOCK {
                let d = &mut dst[j * rows + r0..][..rn];
                for (i, v) in d.iter_mut().enumerate() {
                    *v = tile[i][j];
                }
            }
        }
    });
}

pub fn dequantize(q: &Nf4Tensor) -> crate::Result<Vec<f32>> {
    let mut out = vec![0.0; q.len];
    dequantize_into(q, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_vector_decode_is_the_scalar_one() {
        #[cfg(target_arch = "x86_64")]
        if super::avx512() {
            // Every byte value, 32 to a block, at every position pair over the blocks.
            for a in [1.0f32, 0.37, -2.5e-3, 1.7e4] {
                let lut: [f32; 16] = super::NF4.map(|v| v * a);
                for block in 0..16u8 {
                    let c: [u8; 32] = std::array::from_fn(|i| (i as u8).wrapping_mul(8).wrapping_add(block.wrapping_mul(17)));
                    let (mut want, mut got) = ([0.0f32; 64], [0.0f32; 64]);
                    super::decode_whole_block(&c, &lut, &mut want);
                    // SAFETY: avx512() said the CPU has AVX-512F.
                    unsafe { super::decode_block_avx512(&c, &lut, &mut got) };
                    assert_eq!(got.map(f32::to_bits), want.map(f32::to_bits), "a {a}, codes {c:?}");
                }
            }
        }
    }
}
