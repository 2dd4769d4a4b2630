//! Scaled dot-product attention, the plain softmax form (the flash-attention kernels replace
//! it on every device later). Grouped-query heads; causal with an offset for a KV cache; an
//! optional sliding window.
//!
//! Shapes: q `[B, T, H, D]`, k and v `[B, S, G, D]` (S >= T when a cache holds earlier keys),
//! o `[B, T, H, D]`; query head h reads key/value head `h / (H/G)`. Query t sits at absolute
//! position `S - T + t`; with `causal` it sees keys j <= that position, and with a window W only
//! keys with `pos - j < W`.
//!
//! Packed rows: with `starts` (one entry per query, `[B*T]`), query t of row b also sees only
//! keys j >= `starts[b*T + t]`, the first position of its own example, so packed examples do
//! not attend to each other (the varlen / `cu_seqlens` form, with T == S).
//!
//! Forward, per (b, h, t): `s_j = scale * q·k_j` over the visible j; `p = softmax(s)`;
//! `o = sum_j p_j v_j`.
//! Backward (P recomputed; `dp_j = dO·v_j`, `ds_j = p_j (dp_j - sum_i p_i dp_i)`):
//!   `dq = scale * sum_j ds_j k_j`, `dk_j += scale * ds_j q`, `dv_j += p_j dO`,
//! with dk and dv summed over the query heads that share a key/value head.

/// Sizes and masking of one attention call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionParams {
    pub batch: usize,
    /// T: query length.
    pub q_len: usize,
    /// S: key length (>= T when causal).
    pub kv_len: usize,
    /// H: query heads.
    pub heads: usize,
    /// G: key/value heads (H % G == 0).
    pub kv_heads: usize,
    /// D: head dim.
    pub head_dim: usize,
    pub causal: bool,
    /// Sliding window: a query sees at most this many keys ending at its own position.
    pub window: Option<usize>,
    pub scale: f32,
}

impl AttentionParams {
    /// The visible key range `[lo, hi)` of query t of row b.
    /// Query t sits at position `S - T + t`, which is negative for the first queries when
    /// T > S (allowed without `causal`): a window then ends before key 0 for them.
    pub fn visible(&self, b: usize, t: usize, starts: Option<&[u32]>) -> (usize, usize) {
        // One past the query's position, in [0, S] once clamped.
        let end = self.kv_len as i64 - self.q_len as i64 + t as i64 + 1;
        let clamp = |v: i64| v.clamp(0, self.kv_len as i64) as usize;
        let hi = if self.causal { clamp(end) } else { self.kv_len };
        let mut lo = match self.window {
            Some(w) => clamp(end - w as i64),
            None => 0,
        };
        if let Some(s) = starts {
            lo = lo.max(s[b * self.q_len + t] as usize);
        }
        (lo.min(hi), hi)
    }
    fn q_index(&self, b: usize, t: usize, h: usize) -> usize {
        ((b * self.q_len + t) * self.heads + h) * self.head_dim
    }
    fn kv_index(&self, b: usize, j: usize, g: usize) -> usize {
        ((b * self.kv_len + j) * self.kv_heads + g) * self.head_dim
    }
}

/// The most query rows (query heads per key/value head times T) the split-KV forwards take
/// (`cuda::FwdKernel::SplitKv`, `wgsl::FwdKernel::SplitKv`): one block or workgroup holds all of
/// a key/value head's rows.
pub const SPLIT_KV_MAX_ROWS: usize = 16;

/// Whether the split-KV forwards take shape `p` (when its rows are not packed).
pub fn split_kv_fits(p: &AttentionParams) -> bool {
    p.kv_heads > 0 && p.heads.is_multiple_of(p.kv_heads) && (p.heads / p.kv_heads) * p.q_len <= SPLIT_KV_MAX_ROWS
}

/// The error for a split-KV forward asked for by name on a shape it does not take.
fn split_kv_refusal(op: &'static str, p: &AttentionParams, packed: bool) -> crate::Error {
    crate::Error::InvalidArgument(format!(
        "{op}: the split-KV kernel takes at most {SPLIT_KV_MAX_ROWS} query rows per key/value head and no packed rows, got {} heads over {} x T {}{}",
        p.heads,
        p.kv_heads,
        p.q_len,
        if packed { ", packed" } else { "" }
    ))
}

/// Index loops on purpose: the reference reads like the math.
#[allow(clippy::needless_range_loop)]
pub mod reference {
    use super::AttentionParams;

    fn probs(q: &[f64], k: &[f64], p: &AttentionParams, starts: Option<&[u32]>, b: usize, h: usize, t: usize) -> (usize, Vec<f64>) {
        let g = h / (p.heads / p.kv_heads);
        let (lo, hi) = p.visible(b, t, starts);
        let qi = p.q_index(b, t, h);
        let s: Vec<f64> = (lo..hi)
            .map(|j| {
                let ki = p.kv_index(b, j, g);
                p.scale as f64 * (0..p.head_dim).map(|d| q[qi + d] * k[ki + d]).sum::<f64>()
            })
            .collect();
        let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = s.iter().map(|x| (x - max).exp()).sum();
        (lo, s.iter().map(|x| (x - max).exp() / z).collect())
    }

    pub fn forward(q: &[f64], k: &[f64], v: &[f64], p: &AttentionParams, starts: Option<&[u32]>) -> Vec<f64> {
        let mut o = vec![0.0; q.len()];
        for b in 0..p.batch {
            for h in 0..p.heads {
                let g = h / (p.heads / p.kv_heads);
                for t in 0..p.q_len {
                    let (lo, pr) = probs(q, k, p, starts, b, h, t);
                    let oi = p.q_index(b, t, h);
                    for (n, pj) in pr.iter().enumerate() {
                        let vi = p.kv_index(b, lo + n, g);
                        for d in 0..p.head_dim {
                            o[oi + d] += pj * v[vi + d];
                        }
                    }
                }
            }
        }
        o
    }

    /// Returns (dq, dk, dv).
    pub fn backward(q: &[f64], k: &[f64], v: &[f64], dout: &[f64], p: &AttentionParams, starts: Option<&[u32]>) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
        let sc = p.scale as f64;
        for b in 0..p.batch {
            for h in 0..p.heads {
                let g = h / (p.heads / p.kv_heads);
                for t in 0..p.q_len {
                    let (lo, pr) = probs(q, k, p, starts, b, h, t);
                    let qi = p.q_index(b, t, h);
                    let dp: Vec<f64> = (0..pr.len())
                        .map(|n| {
                            let vi = p.kv_index(b, lo + n, g);
                            (0..p.head_dim).map(|d| dout[qi + d] * v[vi + d]).sum()
                        })
                        .collect();
                    let dot: f64 = pr.iter().zip(&dp).map(|(a, b)| a * b).sum();
                    for n in 0..pr.len() {
                        let ds = pr[n] * (dp[n] - dot);
                        let ki = p.kv_index(b, lo + n, g);
                        for d in 0..p.head_dim {
                            dq[qi + d] += sc * ds * k[ki + d];
                            dk[ki + d] += sc * ds * q[qi + d];
                            dv[ki + d] += pr[n] * dout[qi + d];
                        }
                    }
                }
            }
        }
        (dq, dk, dv)
    }
}

/// The CPU path: per (row, head) and block of 64 queries, the scores `[64, S']` through the
/// `gemm` crate (strided views into q and v, and Kᵀ of each key head copied once as a
/// row-major `[D, S]`) over only the keys the block sees (S' ≤ S; causal blocks skip the keys
/// after their last query), masked softmax, and `P·V`; the backward recomputes P per block,
/// per (row, key/value head) so each task owns its dK and dV (and copies Kᵀ and Vᵀ once).
/// Parallel over those tasks with rayon. Memory is linear in the sequence length: O(64·S) of
/// scores per task, and the transposed copies the size of K (and V); the flash-attention GPU
/// kernels also stream the keys.
pub mod cpu {
    use rayon::prelude::*;

    use super::AttentionParams;
    use crate::kernels::math;
    use crate::kernels::matmul::cpu::{gemm_strided, View};

    math::wide! {
        /// `dS = P ∘ (dP - rowsum(P ∘ dP)) · scale` over one row (`ds` holds dP), in the CPU's
        /// widest vectors.
        fn ds_row(p: &[f32], ds: &mut [f32], dot: f32, scale: f32) = ds_row_lanes
    }

    #[inline(always)]
    fn ds_row_lanes(p: &[f32], ds: &mut [f32], dot: f32, scale: f32) {
        for (d, &pv) in ds.iter_mut().zip(p) {
            *d = pv * (*d - dot) * scale;
        }
    }

    /// Views of head h of q-like tensors (`[B, T, H, D]`) and of head g of k/v-like ones.
    fn q_view<'a>(x: &'a [f32], p: &AttentionParams, b: usize, h: usize) -> View<'a> {
        let off = p.q_index(b, 0, h);
        View { data: &x[off..], rows: p.q_len, cols: p.head_dim, rs: p.heads * p.head_dim, cs: 1 }
    }
    fn kv_view<'a>(x: &'a [f32], p: &AttentionParams, b: usize, g: usize) -> View<'a> {
        let off = p.kv_index(b, 0, g);
        View { data: &x[off..], rows: p.kv_len, cols: p.head_dim, rs: p.kv_heads * p.head_dim, cs: 1 }
    }
    fn transposed(v: View<'_>) -> View<'_> {
        View { rows: v.cols, cols: v.rows, rs: v.cs, cs: v.rs, ..v }
    }

    /// Query rows per block: the CPU path holds scores for one block at a time, `[QB, S]`, so
    /// its memory grows linearly with the sequence, not with T·S.
    const QB: usize = 64;

    /// Keys any query of rows `[t0, t1)` sees: `[lo, hi)` over the block (for causal masks the
    /// keys after the block's last query are skipped, so fully masked tiles cost nothing).
    fn key_range(p: &AttentionParams, starts: Option<&[u32]>, b: usize, t0: usize, t1: usize) -> (usize, usize) {
        let (mut lo, mut hi) = (usize::MAX, 0);
        for t in t0..t1 {
            let (l, h) = p.visible(b, t, starts);
            if l < h {
                lo = lo.min(l);
                hi = hi.max(h);
            }
        }
        if lo >= hi {
            (0, 0)
        } else {
            (lo, hi)
        }
    }

    fn rows<'a>(v: View<'a>, r0: usize, r1: usize) -> View<'a> {
        View { data: &v.data[(r0 * v.rs).min(v.data.len())..], rows: r1 - r0, ..v }
    }

    /// Kᵀ (or Vᵀ) of key/value head g of row b as a contiguous `[D, S]` matrix: every query
    /// block multiplies by it, and a GEMM reads a row-major B without repacking it each time.
    fn kv_transposed(k: &[f32], p: &AttentionParams, b: usize, g: usize) -> Vec<f32> {
        let (s_len, dh) = (p.kv_len, p.head_dim);
        let mut kt = vec![0.0f32; dh * s_len];
        // 16 keys at a time: their rows read whole, each row of Kᵀ written 16 contiguous
        // values (one cache line) at a time.
        const KEYS: usize = 16;
        let (base, stride) = (p.kv_index(b, 0, g), p.kv_heads * dh);
        for j0 in (0..s_len).step_by(KEYS) {
            let j1 = (j0 + KEYS).min(s_len);
            let rows: [&[f32]; KEYS] = std::array::from_fn(|i| if j0 + i < j1 { &k[base + (j0 + i) * stride..][..dh] } else { &[] });
            for d in 0..dh {
                for (row, out) in rows.iter().zip(&mut kt[d * s_len + j0..d * s_len + j1]) {
                    *out = row[d];
                }
            }
        }
        kt
    }

    /// Probabilities of query rows `[t0, t1)` of (b, h) over keys `[klo, khi)` into `out`
    /// `[t1 - t0, khi - klo]`: scaled scores, masked (zero), softmaxed per row, with `kt` that
    /// head's [`kv_transposed`].
    #[allow(clippy::too_many_arguments)]
    fn probs(q: &[f32], kt: &[f32], p: &AttentionParams, starts: Option<&[u32]>, b: usize, h: usize, (t0, t1): (usize, usize), (klo, khi): (usize, usize), out: &mut [f32]) {
        let kw = khi - klo;
        let ktv = View { data: &kt[klo.min(kt.len())..], rows: p.head_dim, cols: kw, rs: p.kv_len, cs: 1 };
        gemm_strided(rows(q_view(q, p, b, h), t0, t1), ktv, out, p.scale, false);
        for (t, row) in (t0..t1).zip(out.chunks_mut(kw.max(1))) {
            let (lo, hi) = p.visible(b, t, starts);
            let (lo, hi) = (lo.clamp(klo, khi) - klo, hi.clamp(klo, khi) - klo);
            let (lo, hi) = (lo.min(hi), hi);
            row[..lo].fill(0.0);
            row[hi..].fill(0.0);
            if lo == hi {
                continue;
            }
            let max = math::max(&row[lo..hi]);
            let z = math::exp_shifted_sum(&mut row[lo..hi], max);
            if z > 0.0 {
                math::scale(&mut row[lo..hi], 1.0 / z);
            }
        }
    }

    pub fn forward(q: &[f32], k: &[f32], v: &[f32], o: &mut [f32], p: &AttentionParams, starts: Option<&[u32]>) {
        if p.q_len <= FEW_ROWS {
            return forward_few(q, k, v, o, p, starts);
        }
        let (t_len, dh) = (p.q_len, p.head_dim);
        let group = p.heads / p.kv_heads;
        let tasks: Vec<(usize, usize)> = (0..p.batch).flat_map(|b| (0..p.heads).map(move |h| (b, h))).collect();
        // Kᵀ of each key head once, shared by the query heads of its group.
        let kts: Vec<Vec<f32>> = (0..p.batch * p.kv_heads).into_par_iter().map(|i| kv_transposed(k, p, i / p.kv_heads, i % p.kv_heads)).collect();
        let outs: Vec<Vec<f32>> = tasks
            .par_iter()
            .map(|&(b, h)| {
                let mut pr = vec![0.0f32; QB.min(t_len) * p.kv_len];
                let mut out = vec![0.0f32; t_len * dh];
                let kt = &kts[b * p.kv_heads + h / group];
                for t0 in (0..t_len).step_by(QB) {
                    let t1 = (t0 + QB).min(t_len);
                    let (klo, khi) = key_range(p, starts, b, t0, t1);
                    probs(q, kt, p, starts, b, h, (t0, t1), (klo, khi), &mut pr);
                    let pv = View { data: &pr, rows: t1 - t0, cols: khi - klo, rs: khi - klo, cs: 1 };
                    gemm_strided(pv, rows(kv_view(v, p, b, h / group), klo, khi), &mut out[t0 * dh..t1 * dh], 1.0, false);
                }
                out
            })
            .collect();
        for (&(b, h), out) in tasks.iter().zip(outs) {
            for t in 0..t_len {
                let oi = p.q_index(b, t, h);
                o[oi..oi + dh].copy_from_slice(&out[t * dh..(t + 1) * dh]);
            }
        }
    }

    /// Query rows up to which [`forward`] takes [`forward_few`] (decoding with a KV cache).
    const FEW_ROWS: usize = 4;
    /// Positions per [`forward_few`] task: their K and V rows of every key/value head (2 KB a
    /// row at 8 heads of D 64, so 128 KB of each) are read once, in order, and stay in L2.
    const KEY_CHUNK: usize = 64;

    /// A few query rows (decoding: one new token against the cache): the cached positions in
    /// chunks of `KEY_CHUNK`, each chunk a task that reads its K rows, then its V rows, in
    /// place and in order, every key/value head of a position at once: the scores of every
    /// query head as dot products, each head's maximum and exp-sum over the chunk, and its
    /// unnormalised sum of value rows. The chunks then combine in order (rescaled to the
    /// overall maximum), so the result does not depend on the threads. The block path would
    /// copy Kᵀ and pack V for a product of one row (at 1024 cached positions that copy was 14%
    /// of an NF4 decoding step of the SmolLM-135M shape). Reading a position's heads together
    /// keeps the reads sequential: with a task per key/value head, reading its rows
    /// `kv_heads·D` floats apart, 16384 cached positions (67 MB of K and V at Llama-3.2-1B's
    /// heads) took 5.9 ms, now 3.3 ms, against 1.2 ms for one pass over K and V (the AVX-512
    /// machine, one alternating run); at 1024 and 4096 positions, which stay in cache, 5% less.
    fn forward_few(q: &[f32], k: &[f32], v: &[f32], o: &mut [f32], p: &AttentionParams, starts: Option<&[u32]>) {
        let (dh, heads, group) = (p.head_dim, p.heads, p.heads / p.kv_heads);
        let rows = p.q_len * heads;
        let chunks = p.kv_len.div_ceil(KEY_CHUNK).max(1);
        let stride = p.kv_heads * dh;
        // Per (b, chunk): each (query row, head)'s (maximum, exp-sum) and unnormalised output.
        type Part = (Vec<(f32, f32)>, Vec<f32>);
        let parts: Vec<Part> = (0..p.batch * chunks)
            .into_par_iter()
            .map(|i| {
                let (b, c) = (i / chunks, i % chunks);
                let (j0, j1) = (c * KEY_CHUNK, ((c + 1) * KEY_CHUNK).min(p.kv_len));
                let mut stats = vec![(f32::NEG_INFINITY, 0.0f32); rows];
                let mut acc = vec![0.0f32; rows * dh];
                let mut s = vec![0.0f32; heads * j1.saturating_sub(j0)];
                for t in 0..p.q_len {
                    let (lo, hi) = p.visible(b, t, starts);
                    let (lo, hi) = (lo.max(j0), hi.min(j1));
                    if lo >= hi {
                        continue;
                    }
                    let n = hi - lo;
                    let s = &mut s[..heads * n];
                    let (kc, vc) = (&k[p.kv_index(b, lo, 0)..], &v[p.kv_index(b, lo, 0)..]);
                    block_scores(&q[p.q_index(b, t, 0)..][..heads * dh], kc, n, stride, group, p.scale, s);
                    for h in 0..heads {
                        let sh = &mut s[h * n..][..n];
                        let max = math::max(sh);
                        let sum = math::exp_shifted_sum(sh, max);
                        stats[t * heads + h] = (max, sum);
                    }
                    block_values(&mut acc[t * heads * dh..][..heads * dh], s, vc, n, stride, group);
                }
                (stats, acc)
            })
            .collect();
        for (b, parts) in parts.chunks(chunks).enumerate() {
            for r in 0..rows {
                let (t, h) = (r / heads, r % heads);
                let out = &mut o[p.q_index(b, t, h)..][..dh];
                let max = parts.iter().map(|(st, _)| st[r].0).fold(f32::NEG_INFINITY, f32::max);
                out.fill(0.0);
                if max == f32::NEG_INFINITY {
                    continue; // no visible key: zeros, as the block path gives
                }
                let mut den = 0.0f32;
                for (st, acc) in parts {
                    let (m, sum) = st[r];
                    if sum == 0.0 {
                        continue;
                    }
                    let w = math::exp(m - max);
                    den += w * sum;
                    for (o, &a) in out.iter_mut().zip(&acc[r * dh..][..dh]) {
                        *o += w * a;
                    }
                }
                if den > 0.0 {
                    out.iter_mut().for_each(|x| *x /= den);
                }
            }
        }
    }

    math::wide! {
        /// `s[h·n + j] = scale·(q_h · k_j,g)` for every query head h (`q`: the heads' rows, one
        /// after another) and position j < n, with `k_j,g = k[j·stride + g·D..][..D]` the row
        /// of h's key/value head g = h / group: each position's heads read together, in order.
        fn block_scores(q: &[f32], k: &[f32], n: usize, stride: usize, group: usize, scale: f32, s: &mut [f32]) = block_scores_lanes
    }

    #[inline(always)]
    fn block_scores_lanes(q: &[f32], k: &[f32], n: usize, stride: usize, group: usize, scale: f32, s: &mut [f32]) {
        let heads = s.len() / n;
        let dh = q.len() / heads;
        for j in 0..n {
            let row = &k[j * stride..][..stride];
            for h in 0..heads {
                s[h * n + j] = scale * math::dot_lanes(&q[h * dh..][..dh], &row[h / group * dh..][..dh]);
            }
        }
    }

    math::wide! {
        /// `acc_h += Σ_j p[h·n + j]·v_j,g` for every query head h (`acc`: the heads' rows), in
        /// j order, with `v_j,g` the value row of h's key/value head as in `block_scores`.
        fn block_values(acc: &mut [f32], p: &[f32], v: &[f32], n: usize, stride: usize, group: usize) = block_values_lanes
    }

    #[inline(always)]
    fn block_values_lanes(acc: &mut [f32], p: &[f32], v: &[f32], n: usize, stride: usize, group: usize) {
        let heads = p.len() / n;
        let dh = acc.len() / heads;
        for j in 0..n {
            let row = &v[j * stride..][..stride];
            for (h, a) in acc.chunks_exact_mut(dh).enumerate() {
                let pj = p[h * n + j];
                for (a, &x) in a.iter_mut().zip(&row[h / group * dh..][..dh]) {
                    *a += pj * x;
                }
            }
        }
    }

    /// Writes dq, dk, dv (overwritten).
    #[allow(clippy::too_many_arguments)]
    pub fn backward(q: &[f32], k: &[f32], v: &[f32], dout: &[f32], dq: &mut [f32], dk: &mut [f32], dv: &mut [f32], p: &AttentionParams, starts: Option<&[u32]>) {
        let (t_len, s_len, dh) = (p.q_len, p.kv_len, p.head_dim);
        let group = p.heads / p.kv_heads;
        let tasks: Vec<(usize, usize)> = (0..p.batch).flat_map(|b| (0..p.kv_heads).map(move |g| (b, g))).collect();
        type Local = (Vec<Vec<f32>>, Vec<f32>, Vec<f32>);
        let results: Vec<Local> = tasks
            .par_iter()
            .map(|&(b, g)| {
                let (mut ldk, mut ldv) = (vec![0.0f32; s_len * dh], vec![0.0f32; s_len * dh]);
                let mut ldq = Vec::with_capacity(group);
                let blk = QB.min(t_len) * s_len;
                let (mut pr, mut ds) = (vec![0.0f32; blk], vec![0.0f32; blk]);
                // Kᵀ and Vᵀ as row-major [D, S] (the score and dP products read them as B).
                let (kt, vt) = (kv_transposed(k, p, b, g), kv_transposed(v, p, b, g));
                for h in g * group..(g + 1) * group {
                    let mut lq = vec![0.0f32; t_len * dh];
                    for t0 in (0..t_len).step_by(QB) {
                        let t1 = (t0 + QB).min(t_len);
                        let (klo, khi) = key_range(p, starts, b, t0, t1);
                        let kw = khi - klo;
                        if kw == 0 {
                            continue;
                        }
                        probs(q, &kt, p, starts, b, h, (t0, t1), (klo, khi), &mut pr);
                        let kb = rows(kv_view(k, p, b, g), klo, khi);
                        let (qb, dob) = (rows(q_view(q, p, b, h), t0, t1), rows(q_view(dout, p, b, h), t0, t1));
                        // dP = dO·Vᵀ, then dS = P ∘ (dP - rowsum(P ∘ dP)), scaled.
                        let vtb = View { data: &vt[klo.min(vt.len())..], rows: dh, cols: kw, rs: s_len, cs: 1 };
                        gemm_strided(dob, vtb, &mut ds, 1.0, false);
                        for (prow, drow) in pr.chunks(kw).zip(ds.chunks_mut(kw)).take(t1 - t0) {
                            let dot = math::dot(prow, drow);
                            ds_row(prow, drow, dot, p.scale);
                        }
                        let dsv = View { data: &ds, rows: t1 - t0, cols: kw, rs: kw, cs: 1 };
                        let pv = View { data: &pr, rows: t1 - t0, cols: kw, rs: kw, cs: 1 };
                        gemm_strided(dsv, kb, &mut lq[t0 * dh..t1 * dh], 1.0, false);
                        gemm_strided(transposed(dsv), qb, &mut ldk[klo * dh..khi * dh], 1.0, true);
                        gemm_strided(transposed(pv), dob, &mut ldv[klo * dh..khi * dh], 1.0, true);
                    }
                    ldq.push(lq);
                }
                (ldq, ldk, ldv)
            })
            .collect();
        for (&(b, g), (ldq, ldk, ldv)) in tasks.iter().zip(results) {
            for (i, lq) in ldq.iter().enumerate() {
                for t in 0..t_len {
                    let qi = p.q_index(b, t, g * group + i);
                    dq[qi..qi + dh].copy_from_slice(&lq[t * dh..(t + 1) * dh]);
                }
            }
            for j in 0..s_len {
                let ki = p.kv_index(b, j, g);
                dk[ki..ki + dh].copy_from_slice(&ldk[j * dh..(j + 1) * dh]);
                dv[ki..ki + dh].copy_from_slice(&ldv[j * dh..(j + 1) * dh]);
            }
        }
    }
}

pub mod wgsl;

/// The CUDA flash attention (`kernels-cuda/flash_attention.cu`, and on an H100/H200 the forward
/// of `flash_attention_sm90.cu`): bf16 or f16 q, k, v and o, f32 softmax statistics.
pub mod cuda;
