//! Scaled dot-product attention, the plain softmax form (the flash-attention kernels replace
//! it on every device later). Grouped-query heads; causal with an offset for a KV cache; an
//! optional sliding window.
//!
//! Shapes: q `[B, T, H, D]`, k and v `[B, S, G, D]` (S >= T when a cache holds earlier keys),
//! o `[B, T, H, D]`; query head h reads key/value head `h / (H/G)`. Query t sits at absolute
//! position `S - T + t`; with `causal` it sees keys j <= that position, and with a window W only
//! keys with `pos - j < W`.
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
    /// The visible key range `[lo, hi)` of query t.
    pub fn visible(&self, t: usize) -> (usize, usize) {
        let pos = self.kv_len - self.q_len + t;
        let hi = if self.causal { (pos + 1).min(self.kv_len) } else { self.kv_len };
        let lo = match self.window {
            Some(w) => (pos + 1).saturating_sub(w),
            None => 0,
        };
        (lo.min(hi), hi)
    }
    fn q_index(&self, b: usize, t: usize, h: usize) -> usize {
        ((b * self.q_len + t) * self.heads + h) * self.head_dim
    }
    fn kv_index(&self, b: usize, j: usize, g: usize) -> usize {
        ((b * self.kv_len + j) * self.kv_heads + g) * self.head_dim
    }
}

/// Index loops on purpose: the reference reads like the math.
#[allow(clippy::needless_range_loop)]
pub mod reference {
    use super::AttentionParams;

    fn probs(q: &[f64], k: &[f64], p: &AttentionParams, b: usize, h: usize, t: usize) -> (usize, Vec<f64>) {
        let g = h / (p.heads / p.kv_heads);
        let (lo, hi) = p.visible(t);
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

    pub fn forward(q: &[f64], k: &[f64], v: &[f64], p: &AttentionParams) -> Vec<f64> {
        let mut o = vec![0.0; q.len()];
        for b in 0..p.batch {
            for h in 0..p.heads {
                let g = h / (p.heads / p.kv_heads);
                for t in 0..p.q_len {
                    let (lo, pr) = probs(q, k, p, b, h, t);
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
    pub fn backward(q: &[f64], k: &[f64], v: &[f64], dout: &[f64], p: &AttentionParams) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
        let sc = p.scale as f64;
        for b in 0..p.batch {
            for h in 0..p.heads {
                let g = h / (p.heads / p.kv_heads);
                for t in 0..p.q_len {
                    let (lo, pr) = probs(q, k, p, b, h, t);
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

pub mod cpu {
    use rayon::prelude::*;

    use super::AttentionParams;

    fn dot(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    /// Scores of query row `qrow` against visible keys, softmaxed in place into `pr`.
    fn probs(qrow: &[f32], k: &[f32], p: &AttentionParams, b: usize, g: usize, t: usize, pr: &mut Vec<f32>) -> usize {
        let (lo, hi) = p.visible(t);
        pr.clear();
        let mut max = f32::NEG_INFINITY;
        for j in lo..hi {
            let ki = p.kv_index(b, j, g);
            let s = p.scale * dot(qrow, &k[ki..ki + p.head_dim]);
            max = max.max(s);
            pr.push(s);
        }
        let mut z = 0.0;
        for s in pr.iter_mut() {
            *s = (*s - max).exp();
            z += *s;
        }
        for s in pr.iter_mut() {
            *s /= z;
        }
        lo
    }

    /// Parallel over (batch, query head); O(S) scratch per task.
    pub fn forward(q: &[f32], k: &[f32], v: &[f32], o: &mut [f32], p: &AttentionParams) {
        let dh = p.head_dim;
        let group = p.heads / p.kv_heads;
        // o is [B, T, H, D]: each (b, t) row holds all heads; split by (b, t) rows.
        o.par_chunks_mut(p.heads * dh).enumerate().for_each(|(bt, orow)| {
            let (b, t) = (bt / p.q_len, bt % p.q_len);
            let mut pr = Vec::with_capacity(p.kv_len);
            for h in 0..p.heads {
                let g = h / group;
                let qi = p.q_index(b, t, h);
                let lo = probs(&q[qi..qi + dh], k, p, b, g, t, &mut pr);
                let out = &mut orow[h * dh..(h + 1) * dh];
                out.fill(0.0);
                for (n, &pj) in pr.iter().enumerate() {
                    let vi = p.kv_index(b, lo + n, g);
                    for (o, &vv) in out.iter_mut().zip(&v[vi..vi + dh]) {
                        *o += pj * vv;
                    }
                }
            }
        });
    }

    /// Writes dq, dk, dv (overwritten). Parallel over (batch, kv head), so each task owns its
    /// slices of dk and dv; dq rows of the group's query heads are written by the same task.
    pub fn backward(q: &[f32], k: &[f32], v: &[f32], dout: &[f32], dq: &mut [f32], dk: &mut [f32], dv: &mut [f32], p: &AttentionParams) {
        let dh = p.head_dim;
        let group = p.heads / p.kv_heads;
        let tasks: Vec<(usize, usize)> = (0..p.batch).flat_map(|b| (0..p.kv_heads).map(move |g| (b, g))).collect();
        let results: Vec<(usize, usize, Vec<f32>, Vec<f32>, Vec<f32>)> = tasks
            .par_iter()
            .map(|&(b, g)| {
                // Local dk/dv for this (b, g): [S, D]; local dq for the group's heads: [T, group, D].
                let (mut ldk, mut ldv) = (vec![0.0f32; p.kv_len * dh], vec![0.0f32; p.kv_len * dh]);
                let mut ldq = vec![0.0f32; p.q_len * group * dh];
                let mut pr = Vec::with_capacity(p.kv_len);
                let mut dp = Vec::with_capacity(p.kv_len);
                for hg in 0..group {
                    let h = g * group + hg;
                    for t in 0..p.q_len {
                        let qi = p.q_index(b, t, h);
                        let (qrow, drow) = (&q[qi..qi + dh], &dout[qi..qi + dh]);
                        let lo = probs(qrow, k, p, b, g, t, &mut pr);
                        dp.clear();
                        dp.extend((0..pr.len()).map(|n| {
                            let vi = p.kv_index(b, lo + n, g);
                            dot(drow, &v[vi..vi + dh])
                        }));
                        let pdp: f32 = pr.iter().zip(&dp).map(|(a, b)| a * b).sum();
                        let lq = &mut ldq[(t * group + hg) * dh..(t * group + hg + 1) * dh];
                        for n in 0..pr.len() {
                            let j = lo + n;
                            let ds = pr[n] * (dp[n] - pdp) * p.scale;
                            let ki = p.kv_index(b, j, g);
                            let krow = &k[ki..ki + dh];
                            let (lk, lv) = (&mut ldk[j * dh..(j + 1) * dh], &mut ldv[j * dh..(j + 1) * dh]);
                            for d in 0..dh {
                                lq[d] += ds * krow[d];
                                lk[d] += ds * qrow[d];
                                lv[d] += pr[n] * drow[d];
                            }
                        }
                    }
                }
                (b, g, ldq, ldk, ldv)
            })
            .collect();
        for (b, g, ldq, ldk, ldv) in results {
            for t in 0..p.q_len {
                for hg in 0..group {
                    let qi = p.q_index(b, t, g * group + hg);
                    dq[qi..qi + dh].copy_from_slice(&ldq[(t * group + hg) * dh..(t * group + hg + 1) * dh]);
                }
            }
            for j in 0..p.kv_len {
                let ki = p.kv_index(b, j, g);
                dk[ki..ki + dh].copy_from_slice(&ldk[j * dh..(j + 1) * dh]);
                dv[ki..ki + dh].copy_from_slice(&ldv[j * dh..(j + 1) * dh]);
            }
        }
    }
}
